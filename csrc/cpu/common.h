// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

#include "row_chunks.h"

namespace fastgen {
namespace cpu {

// Accumulation type: fp32 for fp16/bf16/fp32 input, fp64 for fp64 (used by gradcheck).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Row of a modulation tensor for activation row `row`: per token (B*L, D) or per batch (B, D).
template <typename T>
inline const T* mod_row(const T* mod, int64_t row, int64_t tokens, bool per_token, int64_t dim) {
  return mod + (per_token ? row : row / tokens) * dim;
}

// Rows [first, last) of chunk `chunk` (see row_chunks.h).
inline void chunk_rows(int64_t chunk, int64_t tokens, RowChunks chunks, int64_t& first, int64_t& last) {
  const int64_t batch = chunk / chunks.chunks_per_batch;
  const int64_t start = (chunk % chunks.chunks_per_batch) * chunks.rows_per_chunk;
  first = batch * tokens + start;
  last = batch * tokens + std::min(start + chunks.rows_per_chunk, tokens);
}

// t's data, or nullptr for an absent optional tensor.
template <typename T>
inline const T* data_or_null(const at::Tensor* t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

// Rows per at::parallel_for task: about 64 K elements, so the per-task overhead stays small.
inline int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, (int64_t{1} << 16) / dim); }

// Backward chunks per at::parallel_for task: about row_grain(dim) rows, so a small input runs on
// the calling thread instead of paying a task per chunk.
inline int64_t chunk_grain(int64_t dim, int64_t rows_per_chunk) {
  return std::max<int64_t>(1, row_grain(dim) / rows_per_chunk);
}

}  // namespace cpu
}  // namespace fastgen

// Runs `...` with scalar_t bound to x's dtype: float16, bfloat16, float32 or float64.
#define FASTGEN_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

namespace fastgen {
namespace cpu {

// Runs f(T{}, U{}) for the element type T of `dtype` and U of `other`, a narrower input or output
// beside it (autocast's bf16 next to an fp32 residual stream): U == T, or float32 T with float16 or
// bfloat16 U; other pairs raise, naming `name`.
template <typename F>
void dispatch_dtype_pair(at::ScalarType dtype, at::ScalarType other, const char* name, F&& f) {
  if (other == dtype) {
    FASTGEN_DISPATCH_FLOATING(dtype, "dispatch_dtype_pair", [&] { f(scalar_t{}, scalar_t{}); });
    return;
  }
  TORCH_CHECK(dtype == at::kFloat && (other == at::kHalf || other == at::kBFloat16), name,
              ": the narrower dtype must be float16 or bfloat16 beside float32, or the same; got ", other, " with ",
              dtype);
  if (other == at::kHalf) {
    f(float{}, at::Half{});
  } else {
    f(float{}, at::BFloat16{});
  }
}

}  // namespace cpu
}  // namespace fastgen
