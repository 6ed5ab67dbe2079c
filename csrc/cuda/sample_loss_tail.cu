// The per-sample tails of the fused losses on the GPU (formulas: sample_loss_tail.h): one block
// walks the batch, thread i taking samples i, i + blockDim.x, ..., each first adding its sample's
// partial sums in chunk order (the reduction's finish, sample_reduce.cuh, folded in: one launch
// less); "mean" adds each thread's sum and then the block's in a fixed order. Launch API: launch.h.
#include "cuda/common.cuh"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kTailThreads = 256;

__global__ void __launch_bounds__(kTailThreads) sample_loss_tail_kernel(SampleLossTailArgs args) {
  const int sums_width = tail_sums(args.tail.kind);
  const int saved_width = tail_saved(args.tail.kind);
  double total = 0.0;  // each thread's share of a large batch, past what fp32 counts exactly
  for (int64_t b = threadIdx.x; b < args.batch; b += blockDim.x) {
    double chunk_total[3] = {};  // at most 3 sums per sample (sCM), over up to 256 chunks in fp64
    for (int64_t k = 0; k < args.chunks_per_sample; ++k) {
      const float* row = args.sums + (b * args.chunks_per_sample + k) * sums_width;
      for (int s = 0; s < sums_width; ++s) chunk_total[s] += row[s];
    }
    float sums[3];
    for (int s = 0; s < 3; ++s) sums[s] = static_cast<float>(chunk_total[s]);
    const float value = loss_tail<float>(
        args.tail, sums, args.weight ? args.weight[b] : 1.f, args.t ? args.t[b] : 0.f,
        args.logvar ? args.logvar[b] : 0.f, args.saved + b * saved_width);
    if (args.mean) {
      total += value;
    } else {
      args.loss[b] = value;
    }
  }
  if (args.mean) {  // in fp64 to the end, as the CPU tail
    const double block_total = block_reduce_sum(total);
    if (threadIdx.x == 0) args.loss[0] = static_cast<float>(block_total / static_cast<double>(args.batch));
  }
}

}  // namespace

cudaError_t launch_sample_loss_tail(const SampleLossTailArgs& args, cudaStream_t stream) {
  const auto kind = static_cast<int64_t>(args.tail.kind);
  if (args.batch < 1 || args.chunks_per_sample < 1 || kind < 0 || kind >= kLossTails) return cudaErrorInvalidValue;
  sample_loss_tail_kernel<<<1, kTailThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastgen
