// Entry points of the CPU kernels compiled per instruction set (the row kernels, the losses and
// gelu_tanh): each runs the copy compiled for the widest instruction set the CPU has (cpu/isa.h):
// AVX-512, AVX2 + FMA + F16C, or the baseline.
#include <atomic>

#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTGEN_HAS_X86_COPIES 1  // csrc/cpu/avx2_kernels.cpp and avx512_kernels.cpp compiled them
#else
#define FASTGEN_HAS_X86_COPIES 0
#endif

namespace fastgen {
namespace cpu {
namespace {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

Isa widest_supported() {
#if FASTGEN_HAS_X86_COPIES
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
#else
  return Isa::kBaseline;
#endif
}

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{widest_supported()};
  return isa;
}

}  // namespace

std::string cpu_isa() { return kIsaNames[static_cast<int>(active().load())]; }

void set_cpu_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= static_cast<int>(widest_supported()), "this CPU (or build) has no ", name,
                  " kernels; the widest it runs is ", kIsaNames[static_cast<int>(widest_supported())]);
      active() = static_cast<Isa>(i);
      return;
    }
  }
  TORCH_CHECK(false, "isa must be 'avx512', 'avx2' or 'baseline', got '", name, "'");
}

#if FASTGEN_HAS_X86_COPIES
#define FASTGEN_RUN(kernel, ...)                                 \
  switch (active().load()) {                                     \
    case Isa::kAvx512: return avx512::kernel(__VA_ARGS__);       \
    case Isa::kAvx2: return avx2::kernel(__VA_ARGS__);           \
    case Isa::kBaseline: return baseline::kernel(__VA_ARGS__);   \
  }
#else
#define FASTGEN_RUN(kernel, ...) return baseline::kernel(__VA_ARGS__)
#endif

void modulated_norm_forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                            const at::Tensor* weight, const at::Tensor* bias, double eps, bool rms,
                            at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  FASTGEN_RUN(modulated_norm_forward, x, shift, scale, weight, bias, eps, rms, out, mean, rstd);
}

void modulated_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, bool shift_per_token,
                             const at::Tensor& scale, const at::Tensor* weight,
                             const at::Tensor* bias, const at::Tensor& mean,
                             const at::Tensor& rstd, bool rms, RowChunks chunks, at::Tensor& dx,
                             at::Tensor& dshift, at::Tensor& dscale, at::Tensor& partials) {
  FASTGEN_RUN(modulated_norm_backward, grad_out, x, shift_per_token, scale, weight, bias, mean, rstd, rms,
              chunks, dx, dshift, dscale, partials);
}

void modulated_norm_jvp(const at::Tensor& x, const at::Tensor& scale, const at::Tensor* weight,
                        const at::Tensor* bias, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                        const at::Tensor* tx, const at::Tensor* tshift, const at::Tensor* tscale,
                        const at::Tensor* tweight, const at::Tensor* tbias, at::Tensor& ty) {
  FASTGEN_RUN(modulated_norm_jvp, x, scale, weight, bias, mean, rstd, rms, tx, tshift, tscale, tweight, tbias, ty);
}

void gated_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                            const at::Tensor* y2, const at::Tensor* gate2, at::Tensor& out) {
  FASTGEN_RUN(gated_residual_forward, x, y, gate, y2, gate2, out);
}

void gated_residual_backward(const at::Tensor& grad_out, const at::Tensor& y,
                             const at::Tensor& gate, RowChunks chunks, at::Tensor& dy,
                             at::Tensor& dgate, at::Tensor& partials) {
  FASTGEN_RUN(gated_residual_backward, grad_out, y, gate, chunks, dy, dgate, partials);
}

void qk_norm_rope_forward(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,
                          const at::Tensor* sin, double eps, bool interleaved, at::Tensor& out,
                          at::Tensor& rstd) {
  FASTGEN_RUN(qk_norm_rope_forward, x, weight, cos, sin, eps, interleaved, out, rstd);
}

void qk_norm_rope_backward(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor* weight, const at::Tensor* cos, const at::Tensor* sin,
                           const at::Tensor& rstd, bool interleaved, RowChunks chunks,
                           at::Tensor& dx, at::Tensor& partials) {
  FASTGEN_RUN(qk_norm_rope_backward, grad_out, x, weight, cos, sin, rstd, interleaved, chunks, dx, partials);
}

void qk_norm_rope_jvp(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,
                      const at::Tensor* sin, const at::Tensor& rstd, bool interleaved, const at::Tensor* tx,
                      const at::Tensor* tweight, at::Tensor& out) {
  FASTGEN_RUN(qk_norm_rope_jvp, x, weight, cos, sin, rstd, interleaved, tx, tweight, out);
}

void vsd_loss_sums(const at::Tensor& x_g, const at::Tensor& teacher, const at::Tensor& fake, at::Tensor& sums) {
  FASTGEN_RUN(vsd_loss_sums, x_g, teacher, fake, sums);
}

void squared_residual_sums(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& k,
                           at::Tensor& sums) {
  FASTGEN_RUN(squared_residual_sums, a, b, c, k, sums);
}

void scaled_residual(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& k,
                     const at::Tensor& scale, at::Tensor& out, at::Tensor& negated) {
  FASTGEN_RUN(scaled_residual, a, b, c, k, scale, out, negated);
}

void scm_loss_sums(const at::Tensor (&inputs)[5], const at::Tensor& t, double sigma_data, double warmup,
                   at::Tensor& sums) {
  FASTGEN_RUN(scm_loss_sums, inputs, t, sigma_data, warmup, sums);
}

void scm_loss_backward(const at::Tensor (&inputs)[5], const at::Tensor& coef, const at::Tensor& scale,
                       at::Tensor& out) {
  FASTGEN_RUN(scm_loss_backward, inputs, coef, scale, out);
}

void softplus_sums(const at::Tensor& x, bool negative, at::Tensor& sums) {
  FASTGEN_RUN(softplus_sums, x, negative, sums);
}

void softplus_backward(const at::Tensor& x, bool negative, const at::Tensor& scale, at::Tensor& out) {
  FASTGEN_RUN(softplus_backward, x, negative, scale, out);
}

void gelu_tanh_forward(const at::Tensor& x, at::Tensor& out) { FASTGEN_RUN(gelu_tanh_forward, x, out); }

void gelu_tanh_backward(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& out) {
  FASTGEN_RUN(gelu_tanh_backward, grad_out, x, out);
}

}  // namespace cpu
}  // namespace fastgen
