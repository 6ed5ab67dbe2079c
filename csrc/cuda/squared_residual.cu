// Squared residual, r = a - b + k[b] * c per element of sample b (math:
// fastgen_kernels/ops/squared_residual.py): the per-sample sum of r^2 (reduction scheme:
// cuda/sample_reduce.cuh) and the elementwise out = scale(b) * r (and -out), which is also the VSD
// backward. Launch API: launch.h.
#include "cuda/sample_reduce.cuh"

namespace fastgen {
namespace cuda {
namespace {

struct DifferenceStats {
  static constexpr int kInputs = 2, kStats = 1;  // inputs (a, b)
  __device__ DifferenceStats at(int64_t) const { return *this; }
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    const float r = in[0] - in[1];
    acc[0] += r * r;
  }
};

struct ResidualStats {
  static constexpr int kInputs = 3, kStats = 1;  // inputs (a, b, c)
  const float* k;
  float kb;
  __device__ ResidualStats at(int64_t sample) const { return {k, k[sample]}; }
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    const float r = in[0] - in[1] + kb * in[2];
    acc[0] += r * r;
  }
};

constexpr int kThreads = 256;

// numel % VEC == 0, so a vector stays in one sample.
template <typename T, int VEC, bool HAS_C, bool NEGATED>
__global__ void __launch_bounds__(kThreads) scaled_residual_kernel(
    const T* __restrict__ a,          // (batch, numel)
    const T* __restrict__ b,          // (batch, numel)
    const T* __restrict__ c,          // (batch, numel), read if HAS_C
    const float* __restrict__ k,      // (batch,), read if HAS_C
    SampleScale scale,
    T* __restrict__ out,              // (batch, numel)
    T* __restrict__ negated,          // (batch, numel), written if NEGATED
    int64_t num_vecs,                 // batch * numel / VEC
    int64_t numel) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < num_vecs; v += stride) {
    const int64_t i = v * VEC, sample = i / numel;
    const float s = scale(sample);
    float av[VEC], bv[VEC];
    load_vec(a + i, av);
    load_vec(b + i, bv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) av[j] = s * (av[j] - bv[j]);
    if constexpr (HAS_C) {
      const float ks = s * k[sample];
      float cv[VEC];
      load_vec(c + i, cv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) av[j] += ks * cv[j];
    }
    store_vec(out + i, av);
    if constexpr (NEGATED) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) av[j] = -av[j];
      store_vec(negated + i, av);
    }
  }
}

}  // namespace

cudaError_t launch_squared_residual_sums(const SquaredResidualSumsArgs& args, cudaStream_t stream) {
  if ((args.c == nullptr) != (args.k == nullptr)) return cudaErrorInvalidValue;
  if (args.c == nullptr) {
    const void* const ptrs[2] = {args.a, args.b};
    return launch_sample_reduce(args.dtype, ptrs, args.reduce, DifferenceStats{}, stream);
  }
  const void* const ptrs[3] = {args.a, args.b, args.c};
  return launch_sample_reduce(args.dtype, ptrs, args.reduce, ResidualStats{args.k, 0.0f}, stream);
}

cudaError_t launch_scaled_residual(const ScaledResidualArgs& args, cudaStream_t stream) {
  if ((args.c == nullptr) != (args.k == nullptr)) return cudaErrorInvalidValue;
  return dispatch_elementwise(
      args.dtype, args.batch, args.numel, kThreads, {args.a, args.b, args.c, args.out, args.negated},
      [&](auto type_tag, auto vec_tag, unsigned blocks, int64_t num_vecs) {
        using T = typename decltype(type_tag)::type;
        return dispatch_bool(args.c != nullptr, [&](auto has_c) {
          return dispatch_bool(args.negated != nullptr, [&](auto negated) {
            scaled_residual_kernel<T, decltype(vec_tag)::value, decltype(has_c)::value, decltype(negated)::value>
                <<<blocks, kThreads, 0, stream>>>(
                    static_cast<const T*>(args.a), static_cast<const T*>(args.b),
                    static_cast<const T*>(args.c), args.k, args.scale, static_cast<T*>(args.out),
                    static_cast<T*>(args.negated), num_vecs, args.numel);
            return cudaGetLastError();
          });
        });
      });
}

}  // namespace cuda
}  // namespace fastgen
