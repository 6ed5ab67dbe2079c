// Denoising (score-matching) loss: one pass over pred and target producing the per-sample sum
// S = sum (pred - target)^2. Math: fastgen_kernels/ops/denoising_loss.py; reduction scheme:
// cuda/sample_reduce.cuh. The backward is the shared launch_sample_scaled_difference.
#include "cuda/sample_reduce.cuh"

namespace fastgen {
namespace cuda {
namespace {

struct SquaredErrorStats {
  static constexpr int kInputs = 2, kStats = 1;  // inputs (pred, target); stat S
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    const float d = in[0] - in[1];
    acc[0] += d * d;
  }
};

}  // namespace

cudaError_t launch_denoising_loss_sums(const DenoisingLossSumsArgs& args, cudaStream_t stream) {
  const void* const ptrs[2] = {args.pred, args.target};
  return launch_sample_reduce(args.dtype, ptrs, args.reduce, SquaredErrorStats{}, stream);
}

}  // namespace cuda
}  // namespace fastgen
