// Gated residual (adaLN-Zero): out = x + gate * y (+ gate2 * y2, the JVP's second term), and its
// VJP dy = g * gate, dgate = g * y. Math: fastgen_kernels/ops/gated_residual.py. Launch API and
// conventions: launch.h. x, out and grad_out are T; y, gate (y2, gate2, dy, dgate) are U, T or
// narrower (dispatch_dtype_operand_vec): autocast's bf16 operands are read as they are.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kForwardThreads = 256;

// Offset of the modulation element for activation element i of `row`: per token, or per batch.
__device__ __forceinline__ int64_t modulation_index(int64_t i, int64_t row, int64_t tokens, int64_t dim,
                                                    bool per_token) {
  return per_token ? i : (row / tokens) * dim + (i - row * dim);
}

// Elementwise, grid-stride over vectors of VEC elements. dim % VEC == 0, so a vector stays in one row.
template <typename T, typename U, int VEC, bool SECOND>
__global__ void __launch_bounds__(kForwardThreads) gated_residual_forward_kernel(
    const T* __restrict__ x,      // (rows, dim)
    const U* __restrict__ y,      // (rows, dim)
    const U* __restrict__ gate,   // (rows, dim) if gate_per_token else (B, dim)
    const U* __restrict__ y2,     // (rows, dim) when SECOND
    const U* __restrict__ gate2,  // like gate (gate2_per_token) when SECOND
    T* __restrict__ out,          // (rows, dim)
    int64_t num_vecs,             // rows * dim / VEC
    int64_t tokens, int64_t dim, bool gate_per_token, bool gate2_per_token) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < num_vecs; v += stride) {
    const int64_t i = v * VEC;
    const int64_t row = i / dim;
    float xv[VEC], yv[VEC], gv[VEC];
    load_vec(x + i, xv);
    load_vec(y + i, yv);
    load_vec(gate + modulation_index(i, row, tokens, dim, gate_per_token), gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] += gv[j] * yv[j];
    if constexpr (SECOND) {
      load_vec(y2 + i, yv);
      load_vec(gate2 + modulation_index(i, row, tokens, dim, gate2_per_token), gv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[j] += gv[j] * yv[j];
    }
    store_vec(out + i, xv);
  }
}

// One block per chunk of rows (see launch.h); thread t owns the column vectors t, t + blockDim.x,
// ... and walks the chunk's rows for each, so a per-batch dgate sums in registers, no atomics.
template <typename T, typename U, int VEC>
__global__ void __launch_bounds__(kMaxThreads) gated_residual_backward_kernel(
    const T* __restrict__ grad_out,  // (rows, dim)
    const U* __restrict__ y,         // (rows, dim)
    const U* __restrict__ gate,      // (rows, dim) if gate_per_token else (B, dim)
    U* __restrict__ dy,              // (rows, dim)
    U* __restrict__ dgate,           // (rows, dim) if gate_per_token else nullptr
    float* __restrict__ partials,    // (gridDim.x, dim) if !gate_per_token else nullptr
    int64_t tokens, int64_t dim, int64_t rows_per_chunk, int64_t chunks_per_batch,
    bool gate_per_token) {
  const ChunkRows chunk = chunk_rows(blockIdx.x, tokens, rows_per_chunk, chunks_per_batch);
  for (int64_t col = int64_t{threadIdx.x} * VEC; col < dim; col += int64_t{blockDim.x} * VEC) {
    float gt[VEC], acc[VEC] = {};
    if (!gate_per_token) load_vec(gate + chunk.batch * dim + col, gt);  // fixed over the chunk
#pragma unroll 4  // several rows' loads in flight per thread
    for (int64_t row = chunk.begin; row < chunk.end; ++row) {
      const int64_t i = row * dim + col;
      float g[VEC], yv[VEC], d[VEC];
      load_vec(grad_out + i, g);
      load_vec(y + i, yv);
      if (gate_per_token) load_vec(gate + i, gt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] = g[j] * gt[j];
      store_vec(dy + i, d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] = g[j] * yv[j];
      if (gate_per_token) {
        store_vec(dgate + i, d);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += d[j];
      }
    }
    if (!gate_per_token) store_vec(partials + int64_t{blockIdx.x} * dim + col, acc);
  }
}

}  // namespace

cudaError_t launch_gated_residual_forward(const GatedResidualForwardArgs& args,
                                          cudaStream_t stream) {
  if (!valid_rows(args.rows, args.tokens, args.dim) || (args.y2 == nullptr) != (args.gate2 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  // A grid-stride loop needs no more blocks than the GPU holds at once.
  int64_t max_blocks = 0;
  if (const cudaError_t err = resident_blocks(kForwardThreads, max_blocks); err != cudaSuccess) return err;
  return dispatch_dtype_operand_vec(
      args.dtype, args.operand_dtype, args.dim, {args.x, args.y, args.gate, args.y2, args.gate2, args.out},
      [&](auto type_tag, auto operand_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        using U = typename decltype(operand_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        const int64_t num_vecs = args.rows * args.dim / VEC;
        const auto blocks = static_cast<unsigned>(std::min(ceil_div(num_vecs, kForwardThreads), max_blocks));
        return dispatch_bool(args.y2 != nullptr, [&](auto second) {
          gated_residual_forward_kernel<T, U, VEC, decltype(second)::value><<<blocks, kForwardThreads, 0, stream>>>(
              static_cast<const T*>(args.x), static_cast<const U*>(args.y), static_cast<const U*>(args.gate),
              static_cast<const U*>(args.y2), static_cast<const U*>(args.gate2), static_cast<T*>(args.out),
              num_vecs, args.tokens, args.dim, args.gate_per_token, args.gate2_per_token);
          return cudaGetLastError();
        });
      });
}

cudaError_t launch_gated_residual_backward(const GatedResidualBackwardArgs& args,
                                           cudaStream_t stream) {
  if (!valid_rows(args.rows, args.tokens, args.dim) ||
      !valid_chunks(args.rows, args.tokens, args.rows_per_chunk, args.chunks_per_batch)) {
    return cudaErrorInvalidValue;
  }
  const auto num_chunks = static_cast<unsigned>(args.rows / args.tokens * args.chunks_per_batch);
  return dispatch_dtype_operand_vec(
      args.dtype, args.operand_dtype, args.dim,
      {args.grad_out, args.y, args.gate, args.dy, args.dgate, args.partials},
      [&](auto type_tag, auto operand_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        using U = typename decltype(operand_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        // One thread per column vector, up to kMaxThreads; wider rows loop.
        const int64_t threads =
            std::min<int64_t>(ceil_div(args.dim / VEC, kWarpSize) * kWarpSize, kMaxThreads);
        gated_residual_backward_kernel<T, U, VEC>
            <<<num_chunks, static_cast<unsigned>(threads), 0, stream>>>(
                static_cast<const T*>(args.grad_out), static_cast<const U*>(args.y),
                static_cast<const U*>(args.gate), static_cast<U*>(args.dy),
                static_cast<U*>(args.dgate), args.partials, args.tokens, args.dim,
                args.rows_per_chunk, args.chunks_per_batch, args.gate_per_token);
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace fastgen
