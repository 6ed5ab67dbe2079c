// GELU with the tanh approximation on the CPU (math: fastgen_kernels/ops/gelu_tanh.py), one
// elementwise pass over contiguous tensors, in parallel chunks. With k = sqrt(2 / pi), c = 0.044715
// and s = sigmoid(2 k x (1 + c x^2)):
//   gelu_tanh_forward:  out = x * s                                   (= 0.5 x (1 + tanh(u)))
//   gelu_tanh_backward: out = g * (s + x * s * (1 - s) * 2 k (1 + 3 c x^2))
// The sigmoid form stands in for tanh, which libm and SLEEF evaluate several times slower than the
// vectorizable exp of cpu/softplus_math.h (ATen's tanh-GELU took longer than the MLP's fc1 GEMM
// at a small DiT's sizes). The backward also serves as the JVP (tangent in place of g).
#include "cpu/common.h"
#include "cpu/convert.h"
#include "cpu/softplus_math.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

// Elements per at::parallel_for task: small tensors stay on the calling thread.
constexpr int64_t kGrain = int64_t{1} << 15;

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& out) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    // constants as locals: read through a captured reference, a store to op could alias them and
    // the loop would stay scalar
    const A two_k = A(2 * 0.7978845608028654), c = A(0.044715);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const A v = to_acc(xp[i]);
      op[i] = from_acc<T>(v * sigmoid(two_k * v * (A(1) + c * v * v)));
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& out) {
  using A = acc_t<T>;
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    const A two_k = A(2 * 0.7978845608028654), c = A(0.044715), three_c = A(3 * 0.044715);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const A v = to_acc(xp[i]), v2 = v * v;
      const A s = sigmoid(two_k * v * (A(1) + c * v2));
      op[i] = from_acc<T>(to_acc(gp[i]) * (s + v * s * (A(1) - s) * two_k * (A(1) + three_c * v2)));
    }
  });
}

}  // namespace

void gelu_tanh_forward(const at::Tensor& x, at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "gelu_tanh_forward", [&] { forward_impl<scalar_t>(x, out); });
}

void gelu_tanh_backward(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "gelu_tanh_backward",
                            [&] { backward_impl<scalar_t>(grad_out, x, out); });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
