"""Public fused ops. Each is a torch.library custom op in the namespace ``fastgen`` with
backward and forward-mode (jvp) rules, running on the backend chosen per call."""

from fastgen_kernels.ops import attention as _attention_module
from fastgen_kernels.ops import fp8_linear as _fp8_linear_module
from fastgen_kernels.ops import gan_loss as _gan_loss_module
from fastgen_kernels.ops import gated_residual as _gated_residual_module
from fastgen_kernels.ops import gelu_tanh as _gelu_tanh_module
from fastgen_kernels.ops import modulated_norm as _modulated_norm_module
from fastgen_kernels.ops import modulated_norm_fp8 as _modulated_norm_fp8_module
from fastgen_kernels.ops import qk_norm_rope as _qk_norm_rope_module
from fastgen_kernels.ops import scm_loss as _scm_loss_module
from fastgen_kernels.ops import squared_residual as _squared_residual_module
from fastgen_kernels.ops import vsd_loss as _vsd_loss_module
from fastgen_kernels.ops.attention import attention, attention_jvp
from fastgen_kernels.ops.fp8_linear import fp8_linear, quantize_weight
from fastgen_kernels.ops.gated_residual import gated_residual
from fastgen_kernels.ops.gelu_tanh import gelu_tanh, gelu_tanh_linear
from fastgen_kernels.ops.modulated_norm import modulated_layer_norm, modulated_layer_norm_linear, modulated_rms_norm
from fastgen_kernels.ops.modulated_norm_fp8 import modulated_layer_norm_fp8
from fastgen_kernels.ops.qk_norm_rope import qk_norm_rope

# op module -> its dispatchers, for `fastgen-kernels info` and the tests
OP_MODULES = {
    "modulated_norm": _modulated_norm_module,
    "gated_residual": _gated_residual_module,
    "gelu_tanh": _gelu_tanh_module,
    "attention": _attention_module,
    "qk_norm_rope": _qk_norm_rope_module,
    "vsd_loss": _vsd_loss_module,
    "squared_residual": _squared_residual_module,
    "scm_loss": _scm_loss_module,
    "gan_loss": _gan_loss_module,
    "fp8_linear": _fp8_linear_module,
    "modulated_norm_fp8": _modulated_norm_fp8_module,
}

__all__ = [
    "attention",
    "attention_jvp",
    "fp8_linear",
    "gated_residual",
    "gelu_tanh",
    "gelu_tanh_linear",
    "modulated_layer_norm",
    "modulated_layer_norm_fp8",
    "modulated_layer_norm_linear",
    "modulated_rms_norm",
    "qk_norm_rope",
    "quantize_weight",
    "OP_MODULES",
]
