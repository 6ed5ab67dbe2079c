// The per-sample loss reductions on the GPU (layout: sample_chunks.h, launch.h): a generic
// per-chunk reduction kernel over NIN inputs to NSTAT sums, and the fixed-order finish; and the
// grid-stride loop of the elementwise backward passes. An op supplies a Stats functor:
//
//   struct MyStats {
//     static constexpr int kInputs = ..., kStats = ...;
//     __device__ MyStats at(int64_t sample) const;  // bound to one sample's scalars
//     __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const;
//   };
//
// `at` is called once per block (a chunk lies in one sample), then the call operator once per
// element with the element of every input in fp32.
#pragma once

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastgen {
namespace cuda {

constexpr int kReduceThreads = 256;

template <typename T, int N>
struct Inputs {
  const T* p[N];
};

// One block per chunk: thread t reads vectors t, t + blockDim.x, ... of the chunk, accumulates
// in registers, then a block reduction; thread 0 writes the chunk's partial sums.
template <typename T, int VEC, typename Stats>
__global__ void __launch_bounds__(kReduceThreads) sample_chunk_sums_kernel(
    Inputs<T, Stats::kInputs> in,  // each (batch, numel)
    float* __restrict__ partials,  // (gridDim.x, kStats)
    int64_t numel, int64_t chunk_size, int64_t chunks_per_sample, Stats stats) {
  const int64_t sample = blockIdx.x / chunks_per_sample;
  const int64_t first = (blockIdx.x - sample * chunks_per_sample) * chunk_size;
  const int64_t last = first + chunk_size < numel ? first + chunk_size : numel;
  const int64_t base = sample * numel;
  const Stats bound = stats.at(sample);
  float acc[Stats::kStats] = {};
  for (int64_t i = first + int64_t{threadIdx.x} * VEC; i < last; i += int64_t{blockDim.x} * VEC) {
    float v[Stats::kInputs][VEC];
#pragma unroll
    for (int k = 0; k < Stats::kInputs; ++k) load_vec<T, VEC>(in.p[k] + base + i, v[k]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float e[Stats::kInputs];
#pragma unroll
      for (int k = 0; k < Stats::kInputs; ++k) e[k] = v[k][j];
      bound(e, acc);
    }
  }
  block_reduce_sum(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < Stats::kStats; ++s) partials[int64_t{blockIdx.x} * Stats::kStats + s] = acc[s];
  }
}

// One thread per sample adds its chunks' partial sums in chunk order.
template <int NSTAT>
__global__ void sample_chunks_finish_kernel(const float* __restrict__ partials,  // (batch * chunks, NSTAT)
                                            float* __restrict__ sums,            // (batch, NSTAT)
                                            int64_t batch, int64_t chunks_per_sample) {
  const int64_t sample = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (sample >= batch) return;
  double total[NSTAT] = {};  // up to 256 chunks of one sample (B = 1): fp32 would drift by their count
  for (int64_t k = 0; k < chunks_per_sample; ++k) {
#pragma unroll
    for (int s = 0; s < NSTAT; ++s) total[s] += partials[(sample * chunks_per_sample + k) * NSTAT + s];
  }
#pragma unroll
  for (int s = 0; s < NSTAT; ++s) sums[sample * NSTAT + s] = static_cast<float>(total[s]);
}

inline bool valid_sample_reduce(const SampleReduceArgs& r) {
  return r.batch >= 1 && r.numel >= 1 && r.chunk_size >= 1 && r.chunk_size % kSampleChunkAlign == 0 &&
         (r.numel - 1) / r.chunk_size < r.chunks_per_sample &&
         r.chunks_per_sample <= INT32_MAX / r.batch;
}

// Launches the reduction of Stats over the inputs `ptrs` (all of `dtype`), then the finish (unless
// r.sums is nullptr: a loss's tail then adds the partial sums itself, cuda/sample_loss_tail.cu).
template <typename Stats>
cudaError_t launch_sample_reduce(DType dtype, const void* const (&ptrs)[Stats::kInputs],
                                 const SampleReduceArgs& r, Stats stats, cudaStream_t stream) {
  if (!valid_sample_reduce(r)) return cudaErrorInvalidValue;
  const auto num_chunks = static_cast<unsigned>(r.batch * r.chunks_per_sample);
  bool aligned = true;
  for (const void* p : ptrs) aligned = aligned && all_aligned16({p});
  auto launch = [&](auto type_tag, auto vec_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int VEC = decltype(vec_tag)::value;
    Inputs<T, Stats::kInputs> in;
    for (int k = 0; k < Stats::kInputs; ++k) in.p[k] = static_cast<const T*>(ptrs[k]);
    sample_chunk_sums_kernel<T, VEC, Stats><<<num_chunks, kReduceThreads, 0, stream>>>(
        in, r.partials, r.numel, r.chunk_size, r.chunks_per_sample, stats);
    return cudaGetLastError();
  };
  // 16-byte vectors when every input is aligned and numel (hence every chunk start, chunk_size
  // being a multiple of kSampleChunkAlign) is a multiple of the vector width.
  cudaError_t err = dispatch_dtype(dtype, [&](auto type_tag) {
    constexpr int kVec = kVec16<typename decltype(type_tag)::type>;
    if (aligned && r.numel % kVec == 0) return launch(type_tag, IntTag<kVec>{});
    return launch(type_tag, IntTag<1>{});
  });
  if (err != cudaSuccess || r.sums == nullptr) return err;
  constexpr int kFinishThreads = 128;
  sample_chunks_finish_kernel<Stats::kStats>
      <<<static_cast<unsigned>(ceil_div(r.batch, kFinishThreads)), kFinishThreads, 0, stream>>>(
          r.partials, r.sums, r.batch, r.chunks_per_sample);
  return cudaGetLastError();
}

// The elementwise backward passes over batch samples of numel elements: calls
// launch(TypeTag<T>{}, IntTag<VEC>{}, blocks, num_vecs) with VEC as dispatch_dtype_vec picks it
// (numel % VEC == 0: a vector stays in one sample), num_vecs = batch * numel / VEC and a grid of
// one vector per thread, at most the resident blocks (the kernel loops over the rest).
template <typename F>
cudaError_t dispatch_elementwise(DType dtype, int64_t batch, int64_t numel, int threads,
                                 std::initializer_list<const void*> ptrs, F&& launch) {
  if (batch < 1 || numel < 1) return cudaErrorInvalidValue;
  int64_t max_blocks = 0;
  if (const cudaError_t err = resident_blocks(threads, max_blocks); err != cudaSuccess) return err;
  return dispatch_dtype_vec(dtype, numel, ptrs, [&](auto type_tag, auto vec_tag) {
    const int64_t num_vecs = batch * numel / decltype(vec_tag)::value;
    const auto blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(num_vecs, threads), max_blocks)));
    return launch(type_tag, vec_tag, blocks, num_vecs);
  });
}

}  // namespace cuda
}  // namespace fastgen
