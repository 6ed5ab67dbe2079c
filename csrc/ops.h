// Tensor-level entry points of the C++ CPU kernels, called from csrc/torch_bindings.cpp, which
// validates arguments and allocates every output. Conventions match csrc/cuda/launch.h:
// contiguous tensors (except the strided heads of qk_norm_rope), x-like tensors (B, L, D),
// modulation tensors per token (B, L, D) or per batch (B, D), fp32 statistics (fp64 for fp64
// input), deterministic chunked partial sums for the backward reductions over rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "row_chunks.h"
#include "sample_loss_tail.h"

namespace fastgen {

namespace cpu {

// The tail of a per-sample loss (sample_loss_tail.h) over the batch: sums (B, tail_sums(kind));
// weight, t, logvar (B,) or nullptr; loss () when mean (the batch mean), else (B,); saved
// (B, tail_saved(kind)); all contiguous in the statistics' dtype.
void sample_loss_tail(const LossTailArgs& args, const at::Tensor& sums, const at::Tensor* weight,
                      const at::Tensor* t, const at::Tensor* logvar, bool mean, at::Tensor& loss,
                      at::Tensor& saved);

// The CPU kernels compiled per instruction set, declared once as the entry points, which run the
// copy of each kernel compiled for the widest instruction set the CPU has, and once per copy
// (cpu/isa.h, cpu/isa_dispatch.cpp): the row kernels, the per-sample losses and the tanh-GELU.
// Per-sample losses: x-like tensors (B, ...) contiguous, read as B samples of numel / B elements;
// sums (B, NSTAT) in the statistics' dtype (see sample_chunks.h for the deterministic chunking);
// the tanh-GELU shares their vectorizable sigmoid (cpu/softplus_math.h).
#define FASTGEN_CPU_ISA_KERNELS                                                                    \
  /* Row kernels: x-like tensors (B, L, D), modulation per token (B, L, D) or per batch (B, D). */ \
  /* out = ((x - mean) * rstd * weight + bias) * (1 + scale) + shift; rms: mean = 0, no bias. */   \
  /* weight, bias: nullptr when absent; mean is not written when rms. out has x's dtype, or */     \
  /* float16 / bfloat16 with float32 x. */                                                         \
  void modulated_norm_forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, \
                              const at::Tensor* weight, const at::Tensor* bias, double eps, bool rms, \
                              at::Tensor& out, at::Tensor& mean, at::Tensor& rstd);                \
  /* Writes dx; dshift / dscale (B, L, D) when shift / scale are per token (else they are */       \
  /* undefined); partials[slot] for each reduced gradient (weight, bias, per-batch shift, */       \
  /* per-batch scale). grad_out has x's dtype, or float16/bfloat16 with float32 x; the gradients */ \
  /* have x's. */                                                                                  \
  void modulated_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, bool shift_per_token, \
                               const at::Tensor& scale, const at::Tensor* weight,                  \
                               const at::Tensor* bias, const at::Tensor& mean,                     \
                               const at::Tensor& rstd, bool rms, RowChunks chunks, at::Tensor& dx, \
                               at::Tensor& dshift, at::Tensor& dscale, at::Tensor& partials);      \
  /* The tangent of out given tangents of x, shift, scale, weight and bias (nullptr: zero; each */ \
  /* shaped and typed as its primal, tshift / tscale per token or per batch on their own), from */ \
  /* the forward's mean and rstd; ty has x's dtype, or float16 / bfloat16 with float32 x. */       \
  void modulated_norm_jvp(const at::Tensor& x, const at::Tensor& scale, const at::Tensor* weight,  \
                          const at::Tensor* bias, const at::Tensor& mean, const at::Tensor& rstd,  \
                          bool rms, const at::Tensor* tx, const at::Tensor* tshift,                \
                          const at::Tensor* tscale, const at::Tensor* tweight,                     \
                          const at::Tensor* tbias, at::Tensor& ty);                                \
  /* out = x + gate * y (+ gate2 * y2 when y2 is given). y, gate, y2, gate2 have one dtype: x's, */ \
  /* or float16/bfloat16 with float32 x. */                                                        \
  void gated_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,    \
                              const at::Tensor* y2, const at::Tensor* gate2, at::Tensor& out);     \
  /* dy = grad_out * gate; dgate = grad_out * y, written per row when the gate is per token, else */ \
  /* summed per chunk into partials (1, num_chunks, D). y, gate, dy, dgate have one dtype: */      \
  /* grad_out's, or float16/bfloat16 with float32 grad_out. */                                     \
  void gated_residual_backward(const at::Tensor& grad_out, const at::Tensor& y,                    \
                               const at::Tensor& gate, RowChunks chunks, at::Tensor& dy,           \
                               at::Tensor& dgate, at::Tensor& partials);                           \
  /* QK-norm + rotary for one of q, k: x (B, L, H, Dh) with contiguous head vectors */             \
  /* (x.stride(3) == 1; the B, L, H strides are free); out (B, L, H, Dh) contiguous; rstd */       \
  /* (B, L, H). Per head vector: n = x * rstd * weight, then out = n * cos + rot(n) * sin with */  \
  /* cos, sin (L, Dh) in the statistics' dtype, or out = n when cos is nullptr. weight, cos, sin: */ \
  /* nullptr when absent. */                                                                       \
  void qk_norm_rope_forward(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,  \
                            const at::Tensor* sin, double eps, bool interleaved, at::Tensor& out,  \
                            at::Tensor& rstd);                                                     \
  /* Writes dx (B, L, H, Dh) contiguous and, when weight, partials (num_chunks, Dh): for each */   \
  /* chunk of the B*L*H rows (chunks of row_chunks(1, rows)) the sum of dn * xhat over its rows. */ \
  void qk_norm_rope_backward(const at::Tensor& grad_out, const at::Tensor& x,                      \
                             const at::Tensor* weight, const at::Tensor* cos, const at::Tensor* sin, \
                             const at::Tensor& rstd, bool interleaved, RowChunks chunks,           \
                             at::Tensor& dx, at::Tensor& partials);                                \
  /* The tangent of out (B, L, H, Dh) contiguous given the tangents of x (its head vectors */      \
  /* contiguous, its B, L, H strides free) and of the weight (nullptr: zero), from the forward's */ \
  /* rstd. */                                                                                      \
  void qk_norm_rope_jvp(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,      \
                        const at::Tensor* sin, const at::Tensor& rstd, bool interleaved,           \
                        const at::Tensor* tx, const at::Tensor* tweight, at::Tensor& out);         \
  /* sums[b] = (sum |x_g - teacher|, sum (fake - teacher)^2) over sample b. */                     \
  void vsd_loss_sums(const at::Tensor& x_g, const at::Tensor& teacher, const at::Tensor& fake,     \
                     at::Tensor& sums);                                                            \
  /* With r = a - b + k[b] * c per element of sample b (c and k undefined: r = a - b; k (B,) in */ \
  /* the statistics' dtype): sums[b] = sum r^2 over sample b. */                                   \
  void squared_residual_sums(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,        \
                             const at::Tensor& k, at::Tensor& sums);                               \
  /* out = scale[b] * r with r as above; negated = -out, written when defined. The backward of */  \
  /* the squared residual and of the VSD loss. */                                                  \
  void scaled_residual(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,              \
                       const at::Tensor& k, const at::Tensor& scale, at::Tensor& out,              \
                       at::Tensor& negated);                                                       \
  /* sCM, inputs (F, F_minus, dxt_dt, jvp, x_t), t (B,), tangent g = p . (F_minus, dxt_dt, */      \
  /* jvp, x_t) with p = scm_coefficients(t[b], sigma_data, warmup), d = F - F_minus: */            \
  /* sums[b] = (sum g^2, sum d g, sum d^2). */                                                     \
  void scm_loss_sums(const at::Tensor (&inputs)[5], const at::Tensor& t, double sigma_data,        \
                     double warmup, at::Tensor& sums);                                             \
  /* out = scale[b] * (d - coef[b] . (F_minus, dxt_dt, jvp, x_t)); coef (B, 4), rows strided. */   \
  void scm_loss_backward(const at::Tensor (&inputs)[5], const at::Tensor& coef,                    \
                         const at::Tensor& scale, at::Tensor& out);                                \
  /* With z = -x if negative else x: sums[b] = sum softplus(z) over sample b. */                   \
  void softplus_sums(const at::Tensor& x, bool negative, at::Tensor& sums);                        \
  /* out = scale[b] * (negative ? -1 : 1) * sigmoid(z). */                                         \
  void softplus_backward(const at::Tensor& x, bool negative, const at::Tensor& scale,              \
                         at::Tensor& out);                                                         \
  /* Elementwise over contiguous x: out = gelu_tanh(x), and out = grad_out * gelu_tanh'(x) (the */ \
  /* VJP, and the JVP with the tangent as grad_out). */                                            \
  void gelu_tanh_forward(const at::Tensor& x, at::Tensor& out);                                    \
  void gelu_tanh_backward(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& out);

FASTGEN_CPU_ISA_KERNELS
namespace baseline {
FASTGEN_CPU_ISA_KERNELS
}  // namespace baseline
namespace avx2 {
FASTGEN_CPU_ISA_KERNELS
}  // namespace avx2
namespace avx512 {
FASTGEN_CPU_ISA_KERNELS
}  // namespace avx512

// The instruction set the kernels above run with: "avx512", "avx2" or "baseline". Setting it
// (tests, benchmarks) to one the CPU lacks raises.
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

}  // namespace cpu
}  // namespace fastgen
