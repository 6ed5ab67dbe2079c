// Squared residual on the CPU (math: fastgen_kernels/ops/squared_residual.py), with
// r = a - b + k[b] * c per element of sample b (c, k optional):
//   squared_residual_sums: sums[b] = sum r^2 over sample b, one pass;
//   scaled_residual:       out = scale[b] * r and optionally -out, one elementwise pass (also the
//                          VSD backward).
#include "cpu/convert.h"
#include "cpu/sample_reduce.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

template <typename T>
void sums_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& k,
               at::Tensor& sums) {
  using A = acc_t<T>;
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const int64_t batch = a.size(0), numel = a.numel() / batch;
  if (!c.defined()) {
    sample_chunk_sums<1, A>(batch, numel, sums, [&](int64_t begin, int64_t end, A (&acc)[1]) {
      lane_sums<1, A>(begin, end, acc, [&](int64_t i, A (&t)[1]) {
        const A r = to_acc(ap[i]) - to_acc(bp[i]);
        t[0] = r * r;
      });
    });
    return;
  }
  const T* cp = c.const_data_ptr<T>();
  const A* kp = k.const_data_ptr<A>();
  sample_chunk_sums<1, A>(batch, numel, sums, [&](int64_t begin, int64_t end, A (&acc)[1]) {
    const A kb = kp[begin / numel];
    lane_sums<1, A>(begin, end, acc, [&](int64_t i, A (&t)[1]) {
      const A r = to_acc(ap[i]) - to_acc(bp[i]) + kb * to_acc(cp[i]);
      t[0] = r * r;
    });
  });
}

template <typename T>
void scaled_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& k,
                 const at::Tensor& scale, at::Tensor& out, at::Tensor& negated) {
  using A = acc_t<T>;
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const T* cp = c.defined() ? c.const_data_ptr<T>() : nullptr;
  const A* kp = c.defined() ? k.const_data_ptr<A>() : nullptr;
  const A* sp = scale.const_data_ptr<A>();
  T* op = out.mutable_data_ptr<T>();
  T* np = negated.defined() ? negated.mutable_data_ptr<T>() : nullptr;
  const int64_t batch = a.size(0);
  sample_runs(batch, a.numel() / batch, [&](int64_t sample, int64_t begin, int64_t end) {
    const A s = sp[sample];
    const A ks = cp ? s * kp[sample] : A(0);
    // The four variants as separate loops: a branch-free body vectorizes.
    if (cp && np) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const A v = s * (to_acc(ap[i]) - to_acc(bp[i])) + ks * to_acc(cp[i]);
        op[i] = from_acc<T>(v);
        np[i] = from_acc<T>(-v);
      }
    } else if (cp) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i)
        op[i] = from_acc<T>(s * (to_acc(ap[i]) - to_acc(bp[i])) + ks * to_acc(cp[i]));
    } else if (np) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const A v = s * (to_acc(ap[i]) - to_acc(bp[i]));
        op[i] = from_acc<T>(v);
        np[i] = from_acc<T>(-v);
      }
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i)
        op[i] = from_acc<T>(s * (to_acc(ap[i]) - to_acc(bp[i])));
    }
  });
}

}  // namespace

void squared_residual_sums(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                           const at::Tensor& k, at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(a.scalar_type(), "squared_residual_sums",
                            [&] { sums_impl<scalar_t>(a, b, c, k, sums); });
}

void scaled_residual(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                     const at::Tensor& k, const at::Tensor& scale, at::Tensor& out,
                     at::Tensor& negated) {
  FASTGEN_DISPATCH_FLOATING(a.scalar_type(), "scaled_residual",
                            [&] { scaled_impl<scalar_t>(a, b, c, k, scale, out, negated); });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
