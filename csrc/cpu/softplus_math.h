// exp and log1p on the ranges softplus and sigmoid need, written so that `#pragma omp simd` loops
// vectorize them (the libm calls do not: they cost ~20 ns an element, 5x an eager ATen loop that
// calls SLEEF). fp32: a few ulps; fp64 (gradcheck): the libm functions themselves.
#pragma once

#include "cpu/isa.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {

// e^x for x <= 0, as 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2 (Cody-Waite split of
// ln 2), e^r by its Taylor series to r^7 (remainder below 2^-24). Below x = -87.3, where 2^n
// would leave the normal floats, e^x < 1.2e-38 is flushed to zero.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLowest = -87.3f;
  const bool flush = x < kLowest;
  x = flush ? kLowest : x;  // selects, where std::fmax would be a libm call
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return flush ? 0.0f : p * scale;
}

// log(1 + y) for y in [0, 1]: 2 atanh(s) with s = y / (2 + y) in [0, 1/3], the odd series to s^15
// (remainder below 2^-26 relative); exact for tiny y, no 1 + y rounding.
inline float log1p_unit(float y) {
  const float s = y / (2.0f + y), s2 = s * s;
  float p = 1.0f / 15;
  p = p * s2 + 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

inline double exp_nonpositive(double x) { return std::exp(x); }
inline double log1p_unit(double y) { return std::log1p(y); }

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|): no overflow.
template <typename A>
inline A softplus(A z) {
  return (z > A(0) ? z : A(0)) + log1p_unit(exp_nonpositive(-std::fabs(z)));
}

// sigmoid(z) = 1 / (1 + e^-z), from e = e^-|z| <= 1: 1 / (1 + e) for z >= 0, e / (1 + e) below.
template <typename A>
inline A sigmoid(A z) {
  const A e = exp_nonpositive(-std::fabs(z));
  return (z >= A(0) ? A(1) : e) / (A(1) + e);
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
