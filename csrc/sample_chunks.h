// Per-sample chunking of the loss reductions, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels and mirrored by triton_ops/sample_reduce.py, so all partial sums have one layout. Plain
// C++: nvcc and the host compiler both include it.
//
// A loss reads (B, ...) tensors as B samples of `numel` contiguous elements each. Each sample is
// cut into `chunks_per_sample` chunks of `chunk_size` elements (the last may be shorter); one
// thread (CPU) or thread block (CUDA) reduces one chunk to its partial sums, written to
// partials[sample][chunk][stat], which are then added up per sample in chunk order. The layout
// depends only on the shape, never on the thread count: results are bit-identical run to run.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastgen {

struct SampleChunks {
  int64_t chunk_size;
  int64_t chunks_per_sample;
};

// chunk_size is a multiple of this, so a 16-byte vector never crosses a chunk.
constexpr int64_t kSampleChunkAlign = 1024;

inline SampleChunks sample_chunks(int64_t batch, int64_t numel) {
  // About 256 chunks in all (enough to fill a GPU's SMs or a CPU's threads), each at least
  // kSampleChunkAlign elements so that the partial sums stay tiny next to the inputs.
  constexpr int64_t kTargetChunks = 256;
  const int64_t per_sample = std::max<int64_t>(1, (kTargetChunks + batch - 1) / std::max<int64_t>(batch, 1));
  const int64_t raw = (std::max<int64_t>(numel, 1) + per_sample - 1) / per_sample;
  const int64_t size = (raw + kSampleChunkAlign - 1) / kSampleChunkAlign * kSampleChunkAlign;
  return {size, (std::max<int64_t>(numel, 1) + size - 1) / size};
}

}  // namespace fastgen
