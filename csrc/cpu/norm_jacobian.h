// The normalization's Jacobian applied to one row, shared by the norms' backward (v the gradient
// of xhat, giving dx) and their forward-mode tangent (v the tangent of x, giving that of xhat; the
// Jacobian is symmetric):
//   out = rstd * (v - mean(v) - xhat * mean(v * xhat)),   mean(v) left out for RMSNorm
// v and xhat are the row's fp32 (fp64) buffers. The sums are a loop of their own over them: fused
// with loads of half-precision data, GCC left such loops scalar. out may be v itself.
#pragma once

#include <cstdint>

#include "cpu/convert.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {

template <typename A, typename Out>
inline void apply_norm_jacobian(const A* v, const A* xhat, A rstd, bool rms, int64_t dim, Out* out) {
  A sum = 0, sum_xhat = 0;
#pragma omp simd reduction(+ : sum, sum_xhat)
  for (int64_t c = 0; c < dim; ++c) {
    sum += v[c];
    sum_xhat += v[c] * xhat[c];
  }
  const A inv_dim = A(1) / static_cast<A>(dim);
  const A mean = rms ? A(0) : sum * inv_dim, proj = sum_xhat * inv_dim;
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) out[c] = from_acc<Out>(rstd * (v[c] - mean - xhat[c] * proj));
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
