// GAN logit losses on the CPU (math: fastgen_kernels/ops/gan_loss.py), with z = sign * x:
//   softplus_sums:     sums[b] = sum softplus(z) over sample b, one pass;
//   softplus_backward: out = scale[b] * sign * sigmoid(z), one pass.
#include "cpu/convert.h"
#include "cpu/sample_reduce.h"
#include "cpu/softplus_math.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

template <typename T>
void sums_impl(const at::Tensor& x, bool negative, at::Tensor& sums) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  const A sign = negative ? A(-1) : A(1);
  const int64_t batch = x.size(0);
  sample_chunk_sums<1, A>(batch, x.numel() / batch, sums, [&](int64_t begin, int64_t end, A (&acc)[1]) {
    lane_sums<1, A>(begin, end, acc, [&](int64_t i, A (&t)[1]) { t[0] = softplus(sign * to_acc(xp[i])); });
  });
}

template <typename T>
void backward_impl(const at::Tensor& x, bool negative, const at::Tensor& scale, at::Tensor& out) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  const A* sp = scale.const_data_ptr<A>();
  T* op = out.mutable_data_ptr<T>();
  const A sign = negative ? A(-1) : A(1);
  const int64_t batch = x.size(0);
  sample_runs(batch, x.numel() / batch, [&](int64_t sample, int64_t begin, int64_t end) {
    // sign as a local: read through the lambda's reference, an fp32 store to op could alias it
    // and the loop would stay scalar.
    const A s = sign * sp[sample], z_sign = sign;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      op[i] = from_acc<T>(s * sigmoid(z_sign * to_acc(xp[i])));
  });
}

}  // namespace

void softplus_sums(const at::Tensor& x, bool negative, at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "softplus_sums",
                            [&] { sums_impl<scalar_t>(x, negative, sums); });
}

void softplus_backward(const at::Tensor& x, bool negative, const at::Tensor& scale, at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "softplus_backward",
                            [&] { backward_impl<scalar_t>(x, negative, scale, out); });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
