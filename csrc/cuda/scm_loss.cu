// sCM loss (math: fastgen_kernels/ops/scm_loss.py). Inputs (F, F_minus, dxt_dt, jvp, x_t); per
// sample the tangent g = p . (F_minus, dxt_dt, jvp, x_t) with p = scm_coefficients(t[b]) (from
// sample_loss_tail.h), and d = F - F_minus.
// Forward: the per-sample sums (g^2, d g, d^2) in one pass (scheme: cuda/sample_reduce.cuh).
// Backward: out = scale(b) * (d - q . (F_minus, dxt_dt, jvp, x_t)), q = coef[b], one pass.
// Launch API: launch.h.
#include "cuda/sample_reduce.cuh"

namespace fastgen {
namespace cuda {
namespace {

__device__ __forceinline__ float scm_tangent(const float (&in)[5], float4 p) {
  return p.x * in[1] + p.y * in[2] + p.z * in[3] + p.w * in[4];
}

// Row `sample` of coef, whose rows are coef_stride floats apart.
__device__ __forceinline__ float4 load_coef(const float* coef, int64_t sample, int64_t coef_stride) {
  const float* row = coef + sample * coef_stride;
  return make_float4(row[0], row[1], row[2], row[3]);
}

struct ScmStats {
  static constexpr int kInputs = 5, kStats = 3;  // stats (g^2, d g, d^2)
  const float* t;
  float sigma_data, warmup;
  float4 p;
  __device__ ScmStats at(int64_t sample) const {
    float c[4];
    scm_coefficients(t[sample], sigma_data, warmup, c);
    return {t, sigma_data, warmup, make_float4(c[0], c[1], c[2], c[3])};
  }
  __device__ void operator()(const float (&in)[kInputs], float (&acc)[kStats]) const {
    const float g = scm_tangent(in, p), d = in[0] - in[1];
    acc[0] += g * g;
    acc[1] += d * g;
    acc[2] += d * d;
  }
};

constexpr int kThreads = 256;

// numel % VEC == 0, so a vector stays in one sample.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) scm_loss_backward_kernel(
    Inputs<T, 5> in,                  // (F, F_minus, dxt_dt, jvp, x_t), each (batch, numel)
    const float* __restrict__ coef,   // (batch, 4), rows coef_stride apart
    int64_t coef_stride,
    SampleScale scale,
    T* __restrict__ out,              // (batch, numel)
    int64_t num_vecs,                 // batch * numel / VEC
    int64_t numel) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < num_vecs; v += stride) {
    const int64_t i = v * VEC, sample = i / numel;
    const float s = scale(sample);
    const float4 q = load_coef(coef, sample, coef_stride);
    float x[5][VEC], o[VEC];
#pragma unroll
    for (int k = 0; k < 5; ++k) load_vec(in.p[k] + i, x[k]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float e[5] = {x[0][j], x[1][j], x[2][j], x[3][j], x[4][j]};
      o[j] = s * (e[0] - e[1] - scm_tangent(e, q));
    }
    store_vec(out + i, o);
  }
}

}  // namespace

cudaError_t launch_scm_loss_sums(const ScmLossSumsArgs& args, cudaStream_t stream) {
  const ScmStats stats{args.t, args.sigma_data, args.warmup, {}};
  return launch_sample_reduce(args.dtype, args.inputs, args.reduce, stats, stream);
}

cudaError_t launch_scm_loss_backward(const ScmLossBackwardArgs& args, cudaStream_t stream) {
  const auto& p = args.inputs;
  return dispatch_elementwise(
      args.dtype, args.batch, args.numel, kThreads, {p[0], p[1], p[2], p[3], p[4], args.out},
      [&](auto type_tag, auto vec_tag, unsigned blocks, int64_t num_vecs) {
        using T = typename decltype(type_tag)::type;
        Inputs<T, 5> in;
        for (int k = 0; k < 5; ++k) in.p[k] = static_cast<const T*>(p[k]);
        scm_loss_backward_kernel<T, decltype(vec_tag)::value><<<blocks, kThreads, 0, stream>>>(
            in, args.coef, args.coef_stride, args.scale, static_cast<T*>(args.out), num_vecs, args.numel);
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace fastgen
