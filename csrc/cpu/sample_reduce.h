// CPU side of the per-sample losses: the reductions (layout: csrc/sample_chunks.h) and the
// elementwise backward passes.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "sample_chunks.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {

// Independent running sums per statistic in block_lane_sums: one running sum is bound by the
// latency of its add (a vector add every few cycles); kLanes of them pipeline and vectorize.
constexpr int kLanes = 16;
// lane_sums adds blocks of this many elements apart, their sums in double: one lane summing a whole
// long chunk in A (fp32) drifted with its length (4.6x PyTorch's error at 65539 elements per
// sample, tests/test_losses.py); 256 terms per lane keep it below PyTorch's pairwise sum's.
constexpr int64_t kBlockElements = kLanes * 256;

// Adds term(i, t) (which fills t[0..NSTAT)) over the elements [begin, end) to acc, with kLanes
// running sums per statistic combined in a fixed order: deterministic, and fast.
template <int NSTAT, typename A, typename Term>
inline void block_lane_sums(int64_t begin, int64_t end, A (&acc)[NSTAT], Term& term) {
  A lanes[NSTAT][kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      A t[NSTAT];
      term(i + l, t);
      for (int s = 0; s < NSTAT; ++s) lanes[s][l] += t[s];
    }
  }
  for (int l = 0; i < end; ++i, ++l) {
    A t[NSTAT];
    term(i, t);
    for (int s = 0; s < NSTAT; ++s) lanes[s][l] += t[s];
  }
  for (int s = 0; s < NSTAT; ++s)
    for (int l = 0; l < kLanes; ++l) acc[s] += lanes[s][l];
}

// block_lane_sums over [begin, end) in blocks of kBlockElements, the blocks' sums added in double.
template <int NSTAT, typename A, typename Term>
inline void lane_sums(int64_t begin, int64_t end, A (&acc)[NSTAT], Term&& term) {
  double total[NSTAT] = {};
  for (int64_t block = begin; block < end; block += kBlockElements) {
    A part[NSTAT] = {};
    block_lane_sums<NSTAT, A>(block, std::min(end, block + kBlockElements), part, term);
    for (int s = 0; s < NSTAT; ++s) total[s] += static_cast<double>(part[s]);
  }
  for (int s = 0; s < NSTAT; ++s) acc[s] += static_cast<A>(total[s]);
}

// Reduces `batch` samples of `numel` elements to NSTAT sums each, written to sums (batch, NSTAT)
// of accumulation type A. chunk(begin, end, acc) adds the contributions of the flat elements
// [begin, end) (all in one sample) to acc[0..NSTAT); chunks run in parallel, each into its own
// partial sums, which are then added in chunk order: deterministic for any thread count.
template <int NSTAT, typename A, typename ChunkFn>
void sample_chunk_sums(int64_t batch, int64_t numel, at::Tensor& sums, ChunkFn&& chunk) {
  const SampleChunks chunks = sample_chunks(batch, numel);
  const int64_t num_chunks = batch * chunks.chunks_per_sample;
  std::vector<A> partials(static_cast<size_t>(num_chunks * NSTAT));
  // About 64 K elements per task, so a small input runs on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / chunks.chunk_size);
  at::parallel_for(0, num_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t sample = c / chunks.chunks_per_sample;
      const int64_t first = (c % chunks.chunks_per_sample) * chunks.chunk_size;
      const int64_t last = std::min(first + chunks.chunk_size, numel);
      A acc[NSTAT] = {};
      chunk(sample * numel + first, sample * numel + last, acc);
      std::copy(acc, acc + NSTAT, partials.begin() + c * NSTAT);
    }
  });
  A* out = sums.mutable_data_ptr<A>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int s = 0; s < NSTAT; ++s) {
      double total = 0;  // a sample of many chunks (B = 1) adds many partials
      for (int64_t k = 0; k < chunks.chunks_per_sample; ++k)
        total += static_cast<double>(partials[(b * chunks.chunks_per_sample + k) * NSTAT + s]);
      out[b * NSTAT + s] = static_cast<A>(total);
    }
  }
}

// Runs run(sample, begin, end) over the flat elements [0, batch * numel) of `batch` samples, in
// parallel, each call within one sample (so per-sample scalars are loaded once per run).
template <typename Run>
void sample_runs(int64_t batch, int64_t numel, Run&& run) {
  at::parallel_for(0, batch * numel, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / numel;
      const int64_t stop = std::min(end, (sample + 1) * numel);
      run(sample, i, stop);
      i = stop;
    }
  });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
