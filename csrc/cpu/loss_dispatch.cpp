// Entry points of the CPU loss kernels: each runs the copy compiled for the best instruction set
// the CPU has (cpu/isa.h), AVX2 + FMA + F16C or the baseline.
#include <atomic>

#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTGEN_HAS_AVX2_KERNELS 1  // csrc/cpu/avx2_losses.cpp compiled them
#else
#define FASTGEN_HAS_AVX2_KERNELS 0
#endif

namespace fastgen {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if FASTGEN_HAS_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<bool>& avx2_enabled() {
  static std::atomic<bool> enabled{cpu_has_avx2()};
  return enabled;
}

}  // namespace

std::string loss_isa() { return avx2_enabled() ? "avx2" : "baseline"; }

void set_loss_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "baseline", "isa must be 'avx2' or 'baseline', got '", isa, "'");
  TORCH_CHECK(isa == "baseline" || cpu_has_avx2(), "this CPU (or build) has no AVX2 + FMA + F16C kernels");
  avx2_enabled() = isa == "avx2";
}

#if FASTGEN_HAS_AVX2_KERNELS
#define FASTGEN_RUN(kernel, ...) (avx2_enabled() ? avx2::kernel(__VA_ARGS__) : baseline::kernel(__VA_ARGS__))
#else
#define FASTGEN_RUN(kernel, ...) baseline::kernel(__VA_ARGS__)
#endif

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

void scm_loss_sums(const at::Tensor (&inputs)[5], const at::Tensor& coef, at::Tensor& sums) {
  FASTGEN_RUN(scm_loss_sums, inputs, coef, sums);
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

}  // namespace cpu
}  // namespace fastgen
