// VSD (DMD2) loss: one pass over x_g, x0_teacher, x0_fake producing the per-sample sums
// S1 = sum |x_g - T| and S2 = sum (Fk - T)^2. Math: fastgen_kernels/ops/vsd_loss.py; reduction
// scheme: cuda/sample_reduce.cuh. The backward is launch_scaled_residual.
#include "cuda/sample_reduce.cuh"

namespace fastgen {
namespace cuda {
namespace {

struct VsdStats {
  static constexpr int kInputs = 3, kStats = 2;  // inputs (x_g, T, Fk); stats (S1, S2)
  __device__ VsdStats at(int64_t) const { return *this; }
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    const float d = in[2] - in[1];
    acc[0] += fabsf(in[0] - in[1]);
    acc[1] += d * d;
  }
};

}  // namespace

cudaError_t launch_vsd_loss_sums(const VsdLossSumsArgs& args, cudaStream_t stream) {
  const void* const ptrs[3] = {args.x_g, args.teacher, args.fake};
  return launch_sample_reduce(args.dtype, ptrs, args.reduce, VsdStats{}, stream);
}

}  // namespace cuda
}  // namespace fastgen
