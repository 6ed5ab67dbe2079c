// The per-sample losses' shared backward: out = scale[b] * (a - b) per element of sample b, and
// optionally -out, in one grid-stride elementwise pass. Launch API: launch.h.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// numel % VEC == 0, so a vector stays in one sample.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) sample_scaled_difference_kernel(
    const T* __restrict__ a,          // (batch, numel)
    const T* __restrict__ b,          // (batch, numel)
    const float* __restrict__ scale,  // (batch,)
    T* __restrict__ out,              // (batch, numel)
    T* __restrict__ negated,          // (batch, numel) or nullptr
    int64_t num_vecs,                 // batch * numel / VEC
    int64_t numel) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < num_vecs; v += stride) {
    const int64_t i = v * VEC;
    const float s = scale[i / numel];
    float av[VEC], bv[VEC];
    load_vec(a + i, av);
    load_vec(b + i, bv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) av[j] = s * (av[j] - bv[j]);
    store_vec(out + i, av);
    if (negated != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) av[j] = -av[j];
      store_vec(negated + i, av);
    }
  }
}

}  // namespace

cudaError_t launch_sample_scaled_difference(const SampleScaledDifferenceArgs& args,
                                            cudaStream_t stream) {
  if (args.batch < 1 || args.numel < 1) return cudaErrorInvalidValue;
  int64_t max_blocks = 0;
  if (const cudaError_t err = resident_blocks(kThreads, max_blocks); err != cudaSuccess) return err;
  return dispatch_dtype_vec(
      args.dtype, args.numel, {args.a, args.b, args.out, args.negated},
      [&](auto type_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        const int64_t num_vecs = args.batch * args.numel / VEC;
        const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(num_vecs, kThreads), max_blocks));
        sample_scaled_difference_kernel<T, VEC>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                static_cast<const T*>(args.a), static_cast<const T*>(args.b), args.scale,
                static_cast<T*>(args.out), static_cast<T*>(args.negated), num_vecs, args.numel);
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace fastgen
