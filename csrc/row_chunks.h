// Row chunking of the backward reductions, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels so that their partial sums have one layout. Plain C++: nvcc and the host compiler both
// include it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastgen {

// How the backward kernels cut the L rows of each of the B batches into chunks; one chunk's partial
// sums come from one thread (CPU) or thread block (CUDA). Depends on the shape and on `target`,
// never on the thread count: results are bit-identical run to run on one device. The CPU's target
// is fixed; a GPU's follows its SM count (device_row_chunks), so reduced gradients (dweight, a
// per-sample dshift, ...) differ in their last bits between GPU models and from the CPU's.
struct RowChunks {
  int64_t rows_per_chunk;
  int64_t chunks_per_batch;
};

// About `target` chunks in all: enough to fill a CPU's threads (256, the default) or to keep
// several blocks resident on each of a GPU's SMs (device_row_chunks: about 1000 on an H100/H200),
// few enough that the partial sums (num_chunks x D floats per reduced tensor: 4.7 MB at 1024
// chunks of DiT's 1152 columns) stay small next to the activations they reduce.
inline RowChunks row_chunks(int64_t batch, int64_t tokens, int64_t target = 256) {
  const int64_t per_batch = std::clamp<int64_t>((target + batch - 1) / batch, 1, std::max<int64_t>(tokens, 1));
  const int64_t rows_per_chunk = (tokens + per_batch - 1) / per_batch;
  return {rows_per_chunk, rows_per_chunk == 0 ? 1 : (tokens + rows_per_chunk - 1) / rows_per_chunk};
}

// Partial-sum slots of the modulated-norm backward: partials has shape (4, num_chunks, D); a
// slot is written only when that gradient is reduced over rows.
enum PartialSlot : int { kSlotWeight = 0, kSlotBias = 1, kSlotShift = 2, kSlotScale = 3 };

}  // namespace fastgen
