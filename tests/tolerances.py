"""The one tolerance table: how far a kernel's output may be from the fp64 oracle, per dtype.

Every op here reads low-precision inputs, computes in fp32 and rounds its outputs once; the oracle
computes from the same (upcast) inputs in fp64. So the error is the output's rounding plus fp32
arithmetic error:

- rtol: one ulp of the output dtype relative to the value (rounding is at most half an ulp; the
  other half absorbs fp32 error that moves a value across a rounding boundary).
- atol: for values near zero that come from cancelling terms of size ~1 to ~10 (modulation terms,
  sums over D <= 1152 or over the B*L rows of a gradient), fp32 error of about sqrt(N) * 2^-24 * 10,
  then rounded: a few ulps of 1 in the output dtype.
"""

import math

import torch

TOLERANCES = {
    # dtype: (rtol, atol)
    torch.float64: (1e-12, 1e-12),  # fp64 kernels against the fp64 oracle: summation order only
    # fp32: sums over D <= 1152 terms of size <= ~30 (gx * xhat) err by ~sqrt(D) 2^-24 30 = 6e-5
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2**-10, 2**-10),  # fp16 has 10 mantissa bits: 1 ulp relative is 2^-10
    torch.bfloat16: (2**-7, 2**-7),  # bf16 has 7 mantissa bits: 1 ulp relative is 2^-7
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """actual (a kernel's output in ``dtype``) against the fp64 oracle ``expected``."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_within_peer(actual: torch.Tensor, peer: torch.Tensor, expected: torch.Tensor,
                       dtype: torch.dtype, terms: int, what: str, exponent: float = 0.0,
                       magnitude: float | None = None) -> None:
    """The rule for attention and long reductions: a kernel's largest error against the fp64
    oracle ``expected`` may be twice that of ``peer`` (the same math done by PyTorch in ``dtype``)
    plus rounding noise, in units of ``magnitude``: the largest sum of |terms| behind an output
    (rounding errors scale with the terms, not with what is left after they cancel), by default
    the largest |expected|:

    - a ``terms``-term sum in ``dtype`` rounds with a random-walk error of about sqrt(terms) ulps;
    - exp(x) of an fp32 argument of size ``exponent`` (attention's scores, which flash kernels
      recompute and shift by the log-sum-exp) is off by ``exponent`` fp32 ulps, relatively.

    In fp32 this noise dominates (PyTorch's own fp32 kernels differ by that much with summation
    order and exp argument); in fp16 and bf16 the peer's error does.
    """
    def max_error(t: torch.Tensor) -> float:
        return (t.double() - expected.double()).abs().max().item()

    ulps = terms**0.5 * torch.finfo(dtype).eps + exponent * torch.finfo(torch.float32).eps
    noise = ulps * (expected.abs().max().item() if magnitude is None else magnitude)
    bound = 2 * max_error(peer) + noise
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    assert max_error(actual) <= bound, (
        f"{what} ({dtype}): error {max_error(actual):.3g} > 2 x peer's {max_error(peer):.3g} "
        f"+ noise {noise:.3g}")


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                        floor: float = 0.0) -> None:
    """As assert_close, in units of the largest |expected|: for loss gradients, whose size is set
    by 1/D (about 1e-4 here), so absolute tolerances made for O(1) values would accept anything.
    Each element is one rounding of an fp32 value (a per-sample scale times a difference), so the
    dtype's tolerance relative to the tensor's scale bounds it, plus one subnormal step of the
    dtype: tiny gradients (inputs of size 1e-3 over D = 343 give 6e-6, below float16's smallest
    normal 6.1e-5) round to the subnormal grid, whatever the kernel. ``floor``: the least scale, for
    values that are small differences of larger terms (sCM's d loss / d logvar = 1 - S k near the
    fixed point S k = 1 is 1e-3 with an error of the dtype's eps, not of eps 1e-3)."""
    rtol, atol = TOLERANCES[dtype]
    finfo = torch.finfo(dtype)
    scale = expected.double().abs().max().clamp_min(max(floor, torch.finfo(torch.float64).tiny)).item()
    torch.testing.assert_close(actual.double() / scale, expected.double() / scale, rtol=rtol,
                               atol=atol + finfo.smallest_normal * finfo.eps / scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def snr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``actual`` against ``expected``, in dB."""
    expected = expected.double()
    noise = (actual.double() - expected).square().sum()
    return 10 * math.log10(expected.square().sum().item() / max(noise.item(), 1e-300))


def assert_same_codes(codes: torch.Tensor, ref: torch.Tensor, backend: str) -> None:
    """Bit-identical e4m3 codes, but for known faults of the Triton interpreter's fp32 -> e4m3
    cast (GPUs cast in hardware, cvt.rn.satfinite): it may round to the other neighbour of the
    value (double rounding through fp16), and rounding up to a power of two loses the carry into
    the exponent (127.9 -> 64, not 128), also after a double rounding (123.99 -> 64, not 120).
    Its codes are one of those, on a few elements: values that round up to a power of two are
    about 1/16 of a binade, so up to about a tenth of a small sample."""
    bad = codes.view(torch.uint8) != ref.view(torch.uint8)
    if backend != "triton":
        assert not bad.any()
        return

    def steps_from_reference(values: torch.Tensor) -> torch.Tensor:  # e4m3 codes are monotonic per sign
        return (values.to(torch.float8_e4m3fn).view(torch.uint8).int() - ref[bad].view(torch.uint8).int()).abs()

    got = codes[bad].float()
    lost_carry = (torch.frexp(got).mantissa.abs() == 0.5) & (steps_from_reference(2 * got) <= 1)
    assert ((steps_from_reference(got) == 1) | lost_carry).all() and bad.float().mean() < 0.15
