// Conversions between the stored dtypes and the fp32 (fp64) accumulation type, written as plain
// bit arithmetic and selects so that `#pragma omp simd` loops vectorize them. c10's BFloat16 and
// Half conversions are scalar code (a NaN branch, a software fp16 path without F16C): through
// them a bf16 pass ran 8x and an fp16 pass 20x slower than the fp32 one. Rounding is to nearest
// even, NaN stays NaN, overflow goes to infinity: the same results as c10's.
#pragma once

#include "cpu/isa.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(c10::BFloat16 v) { return bits_float(uint32_t{v.x} << 16); }

// fp16 -> fp32 by exponent range, combined by selects: normals rebias the exponent (+112),
// subnormals are their mantissa times 2^-24 (exact; no fp32 subnormal arithmetic, so also right
// with denormals-are-zero), Inf/NaN get the all-ones fp32 exponent.
inline float to_acc(c10::Half v) {
  const uint32_t h = v.x, magnitude = (h & 0x7FFFu) << 13, exponent = h & 0x7C00u;
  const float subnormal = static_cast<float>(static_cast<int32_t>(h & 0x3FFu)) * 5.9604644775390625e-8f;
  const uint32_t bits = exponent == 0x7C00u ? (magnitude | 0x7F800000u)
                        : exponent == 0     ? float_bits(subnormal)
                                            : magnitude + (112u << 23);
  return bits_float(bits | ((h & 0x8000u) << 16));
}

template <typename T>
inline T from_acc(float v);
template <typename T>
inline T from_acc(double v);

template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }

// fp32 -> bf16: add half an ulp of bf16 (minus one when the kept bit is even: ties to even) and
// truncate; NaN maps to the quiet NaN 0x7FC0.
template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// fp32 -> fp16, rounding to nearest even in each of the three ranges, combined by selects:
// - |v| >= 65520 (rounds past the largest half) or Inf/NaN: 0x7C00, or 0x7E00 for NaN;
// - |v| < 2^-14 (fp16 subnormals): adding 0.5 aligns the mantissa so that the fp32 adder rounds
//   it at the fp16 subnormal ulp, then the bits are read off;
// - normals: rebias the exponent and round the 13 dropped mantissa bits to even.
template <>
inline c10::Half from_acc<c10::Half>(float v) {
  const uint32_t u = float_bits(v), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  const uint32_t overflow = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x477FF000u ? overflow : (a < (113u << 23) ? subnormal : normal);
  return c10::Half(static_cast<uint16_t>(h | sign), c10::Half::from_bits());
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
