"""Fused distillation losses (issue 4): each a ``fastgen::`` custom op with autograd, one fused
reduction pass forward and one elementwise pass backward, on the cuda, triton, cpu or reference
backend chosen per call.

Inputs are (B, ...) tensors of any rank, float16/bfloat16/float32 (float64 on cpu and reference),
accumulated in fp32; per-sample scalars are (B,) tensors. Each loss returns the batch mean
(``reduction="mean"``) or the per-sample (B,) vector (``reduction="none"``), in fp32.

Present:

- :func:`vsd_loss`: DMD2's distribution-matching (VSD) loss, with f-Distill's per-sample weight;
- :func:`denoising_loss`: the weighted per-sample MSE of teacher SFT and the fake-score update.

To come, on the same scheme (fastgen_kernels/ops/_sample_loss.py): consistency (CM, pseudo-Huber
or L2), sCM (tangent normalization and adaptive weighting), MeanFlow (adaptive loss) and the GAN
losses (softplus generator / discriminator terms, R1).
"""

from fastgen_kernels.ops.denoising_loss import denoising_loss
from fastgen_kernels.ops.vsd_loss import vsd_loss

__all__ = ["denoising_loss", "vsd_loss"]
