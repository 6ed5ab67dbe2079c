// GAN logit losses (math: fastgen_kernels/ops/gan_loss.py), z = sign * x with sign = -1 if
// negative else 1: the per-sample sum of softplus(z) (scheme: cuda/sample_reduce.cuh) and the
// elementwise backward out = scale(b) * sign * sigmoid(z). Launch API: launch.h.
#include "cuda/sample_reduce.cuh"

namespace fastgen {
namespace cuda {
namespace {

// log(1 + e^z) without overflow: max(z, 0) + log1p(e^-|z|).
__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.0f) + log1pf(__expf(-fabsf(z))); }

struct SoftplusStats {
  static constexpr int kInputs = 1, kStats = 1;
  float sign;
  __device__ SoftplusStats at(int64_t) const { return *this; }
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    acc[0] += softplus(sign * in[0]);
  }
};

constexpr int kThreads = 256;

// numel % VEC == 0, so a vector stays in one sample.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) softplus_backward_kernel(
    const T* __restrict__ x,          // (batch, numel)
    float sign,                       // -1 or 1
    SampleScale scale,
    T* __restrict__ out,              // (batch, numel)
    int64_t num_vecs,                 // batch * numel / VEC
    int64_t numel) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < num_vecs; v += stride) {
    const int64_t i = v * VEC;
    const float s = sign * scale(i / numel);
    float xv[VEC];
    load_vec(x + i, xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] = s / (1.0f + __expf(-sign * xv[j]));
    store_vec(out + i, xv);
  }
}

}  // namespace

cudaError_t launch_softplus_sums(const SoftplusSumsArgs& args, cudaStream_t stream) {
  const void* const ptrs[1] = {args.x};
  return launch_sample_reduce(args.dtype, ptrs, args.reduce, SoftplusStats{args.negative ? -1.0f : 1.0f},
                              stream);
}

cudaError_t launch_softplus_backward(const SoftplusBackwardArgs& args, cudaStream_t stream) {
  return dispatch_elementwise(
      args.dtype, args.batch, args.numel, kThreads, {args.x, args.out},
      [&](auto type_tag, auto vec_tag, unsigned blocks, int64_t num_vecs) {
        using T = typename decltype(type_tag)::type;
        softplus_backward_kernel<T, decltype(vec_tag)::value><<<blocks, kThreads, 0, stream>>>(
            static_cast<const T*>(args.x), args.negative ? -1.0f : 1.0f, args.scale,
            static_cast<T*>(args.out), num_vecs, args.numel);
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace fastgen
