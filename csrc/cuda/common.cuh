// Helpers shared by the CUDA kernels: dtype/vector-width dispatch, 16-byte vector loads and stores
// with fp32 conversion, block reductions, and the backward's row chunks.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace fastgen {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------ host side

template <typename T>
struct TypeTag {
  using type = T;
};
template <int N>
using IntTag = std::integral_constant<int, N>;

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;  // nullptr passes
  }
  return true;
}

// Calls f(TypeTag<T>{}) with T the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(TypeTag<T>{}, IntTag<VEC>{}) for `dtype`, with VEC the 16-byte vector width of T when dim
// is a multiple of it (so no vector crosses a row) and every pointer in `ptrs` is 16-byte aligned,
// else VEC = 1.
template <typename F>
cudaError_t dispatch_dtype_vec(DType dtype, int64_t dim, std::initializer_list<const void*> ptrs,
                               F&& f) {
  const bool aligned = all_aligned16(ptrs);
  return dispatch_dtype(dtype, [&](auto type_tag) {
    constexpr int kVec = kVec16<typename decltype(type_tag)::type>;
    if (aligned && dim % kVec == 0) return f(type_tag, IntTag<kVec>{});
    return f(type_tag, IntTag<1>{});
  });
}

// Calls f(TypeTag<T>{}, TypeTag<U>{}, IntTag<VEC>{}) for the element type T of `dtype` and U of
// `operand` (a narrower input or output next to T's), the combinations the mixed-dtype kernels are
// built for: U == T, or T fp32 with U fp16 or bf16. VEC is as in dispatch_dtype_vec for T, the
// wider type (U's vectors are then at most as wide, so as aligned).
template <typename F>
cudaError_t dispatch_dtype_operand_vec(DType dtype, DType operand, int64_t dim,
                                       std::initializer_list<const void*> ptrs, F&& f) {
  if (operand == dtype) {
    return dispatch_dtype_vec(dtype, dim, ptrs,
                              [&](auto type_tag, auto vec_tag) { return f(type_tag, type_tag, vec_tag); });
  }
  if (dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const bool vectorized = all_aligned16(ptrs) && dim % kVec16<float> == 0;
  return dispatch_dtype(operand, [&](auto operand_tag) {
    if constexpr (std::is_same_v<typename decltype(operand_tag)::type, float>) {
      return cudaErrorInvalidValue;  // operand == dtype, handled above
    } else {
      if (vectorized) return f(TypeTag<float>{}, operand_tag, IntTag<kVec16<float>>{});
      return f(TypeTag<float>{}, operand_tag, IntTag<1>{});
    }
  });
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template parameter.
template <typename F>
cudaError_t dispatch_bool(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// How many blocks of `threads` threads the current GPU holds at once: the most a grid-stride loop
// needs.
inline cudaError_t resident_blocks(int threads, int64_t& blocks) {
  int device = 0, num_sms = 0, threads_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  }
  blocks = int64_t{num_sms} * (threads_per_sm / threads);
  return err;
}

// rows = B * tokens with every count positive.
inline bool valid_rows(int64_t rows, int64_t tokens, int64_t dim) {
  return rows >= 1 && tokens >= 1 && dim >= 1 && rows % tokens == 0;
}

// The chunks cover every token of a batch and their number, B * chunks_per_batch, fits grid.x.
// Call after valid_rows.
inline bool valid_chunks(int64_t rows, int64_t tokens, int64_t rows_per_chunk,
                         int64_t chunks_per_batch) {
  return rows_per_chunk >= 1 && (tokens - 1) / rows_per_chunk < chunks_per_batch &&
         chunks_per_batch <= INT32_MAX / (rows / tokens);
}

// ---------------------------------------------------------------------------------- device side

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one access (ld/st.v4 at 16 bytes). Alignment is capped at 16
// bytes, what the launchers check: 8 fp32 partial sums span 32 and move as two 16-byte halves.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

// Reads p[0..N) as fp32; p must be aligned to the vector.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(raw.v[i]);
}

// As load_vec from p + offset, or `fill` everywhere when p is null (an absent weight or bias).
template <typename T, int N>
__device__ __forceinline__ void load_vec_or(const T* p, int64_t offset, float fill,
                                            float (&out)[N]) {
  if (p != nullptr) {
    load_vec(p + offset, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = fill;
  }
}

// Writes in[0..N), rounded to T, to p[0..N); p must be aligned to the vector.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int i = 0; i < N; ++i) raw.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

// Butterfly sum: every lane ends with the same, bitwise identical total.
template <typename T>  // float, or double where a sum must keep more digits (the losses' batch mean)
__device__ __forceinline__ T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums each of v[0..N) over the thread block; every thread gets the totals. blockDim.x must be a
// multiple of 32. The order of the additions depends only on blockDim.x: deterministic.
template <typename T, int N>
__device__ __forceinline__ void block_reduce_sum(T (&v)[N]) {
  __shared__ T warp_sums[N][kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = warp_reduce_sum(v[k]);
    if (lane == 0) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  // Each warp adds up the per-warp sums itself, which saves a broadcast through shared memory.
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_reduce_sum(lane < num_warps ? warp_sums[k][lane] : T(0));
  __syncthreads();  // the next call may overwrite warp_sums
}

template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v) {
  T sums[1] = {v};
  block_reduce_sum(sums);
  return sums[0];
}

// The rows [begin, end) of the backward's chunk `chunk` (see launch.h), all in batch `batch`.
struct ChunkRows {
  int64_t batch, begin, end;
};

__device__ __forceinline__ ChunkRows chunk_rows(int64_t chunk, int64_t tokens,
                                                int64_t rows_per_chunk, int64_t chunks_per_batch) {
  const int64_t batch = chunk / chunks_per_batch;
  const int64_t first = (chunk - batch * chunks_per_batch) * rows_per_chunk;  // within the batch
  const int64_t last = first + rows_per_chunk < tokens ? first + rows_per_chunk : tokens;
  return {batch, batch * tokens + first, batch * tokens + last};
}

}  // namespace cuda
}  // namespace fastgen
