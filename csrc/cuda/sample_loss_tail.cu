// The per-sample tails of the fused losses on the GPU (formulas: sample_loss_tail.h): one block
// walks the batch, thread i taking samples i, i + blockDim.x, ...; "mean" adds each thread's sum
// and then the block's in a fixed order. Launch API: launch.h.
#include "cuda/common.cuh"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kTailThreads = 256;

__global__ void __launch_bounds__(kTailThreads) sample_loss_tail_kernel(SampleLossTailArgs args) {
  const int sums_width = tail_sums(args.tail.kind);
  const int saved_width = tail_saved(args.tail.kind);
  float total = 0.f;
  for (int64_t b = threadIdx.x; b < args.batch; b += blockDim.x) {
    const float value = loss_tail<float>(
        args.tail, args.sums + b * sums_width, args.weight ? args.weight[b] : 1.f, args.t ? args.t[b] : 0.f,
        args.logvar ? args.logvar[b] : 0.f, args.saved + b * saved_width);
    if (args.mean) {
      total += value;
    } else {
      args.loss[b] = value;
    }
  }
  if (args.mean) {
    total = block_reduce_sum(total);
    if (threadIdx.x == 0) args.loss[0] = total / static_cast<float>(args.batch);
  }
}

}  // namespace

cudaError_t launch_sample_loss_tail(const SampleLossTailArgs& args, cudaStream_t stream) {
  const auto kind = static_cast<int64_t>(args.tail.kind);
  if (args.batch < 1 || kind < 0 || kind >= kLossTails) return cudaErrorInvalidValue;
  sample_loss_tail_kernel<<<1, kTailThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastgen
