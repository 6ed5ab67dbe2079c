// sCM loss on the CPU (math: fastgen_kernels/ops/scm_loss.py). With per-sample coefficients
// p[b] = (p0, p1, p2, p3) = scm_coefficients(t[b]) (sample_loss_tail.h), the tangent of sample b
// is g = p0 F_minus + p1 dxt_dt + p2 jvp + p3 x_t and d = F - F_minus:
//   scm_loss_sums:     sums[b] = (sum g^2, sum d g, sum d^2), one pass over the five inputs;
//   scm_loss_backward: out = scale[b] * (d - (q[b] . inputs)), q = p / ||g||-normalizer, one pass.
#include "cpu/convert.h"
#include "cpu/sample_reduce.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

template <typename T>
struct ScmInputs {
  const T *F, *F_minus, *dxt_dt, *jvp, *x_t;
  explicit ScmInputs(const at::Tensor (&in)[5])
      : F(in[0].const_data_ptr<T>()), F_minus(in[1].const_data_ptr<T>()),
        dxt_dt(in[2].const_data_ptr<T>()), jvp(in[3].const_data_ptr<T>()),
        x_t(in[4].const_data_ptr<T>()) {}
  // g = p . (F_minus, dxt_dt, jvp, x_t) at element i; fm receives F_minus[i].
  template <typename A>
  A tangent(int64_t i, const A* p, A& fm) const {
    fm = to_acc(F_minus[i]);
    return p[0] * fm + p[1] * to_acc(dxt_dt[i]) + p[2] * to_acc(jvp[i]) +
           p[3] * to_acc(x_t[i]);
  }
};

template <typename T>
void sums_impl(const at::Tensor (&inputs)[5], const at::Tensor& t, double sigma_data, double warmup,
               at::Tensor& sums) {
  using A = acc_t<T>;
  const ScmInputs<T> in(inputs);
  const A* tp = t.const_data_ptr<A>();
  const int64_t batch = inputs[0].size(0), numel = inputs[0].numel() / batch;
  sample_chunk_sums<3, A>(batch, numel, sums, [&](int64_t begin, int64_t end, A (&acc)[3]) {
    A p[4];
    scm_coefficients<A>(tp[begin / numel], static_cast<A>(sigma_data), static_cast<A>(warmup), p);
    lane_sums<3, A>(begin, end, acc, [&](int64_t i, A (&t)[3]) {
      A fm;
      const A g = in.tangent(i, p, fm);
      const A d = to_acc(in.F[i]) - fm;
      t[0] = g * g;
      t[1] = d * g;
      t[2] = d * d;
    });
  });
}

template <typename T>
void backward_impl(const at::Tensor (&inputs)[5], const at::Tensor& coef, const at::Tensor& scale,
                   at::Tensor& out) {
  using A = acc_t<T>;
  const ScmInputs<T> in(inputs);
  const A* cp = coef.const_data_ptr<A>();
  const A* sp = scale.const_data_ptr<A>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t batch = inputs[0].size(0);
  sample_runs(batch, inputs[0].numel() / batch, [&](int64_t sample, int64_t begin, int64_t end) {
    const A s = sp[sample];
    const A* row = cp + sample * coef.stride(0);
    const A q[4] = {row[0], row[1], row[2], row[3]};
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      A fm;
      const A g = in.tangent(i, q, fm);
      op[i] = from_acc<T>(s * (to_acc(in.F[i]) - fm - g));
    }
  });
}

}  // namespace

void scm_loss_sums(const at::Tensor (&inputs)[5], const at::Tensor& t, double sigma_data, double warmup,
                   at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(inputs[0].scalar_type(), "scm_loss_sums",
                            [&] { sums_impl<scalar_t>(inputs, t, sigma_data, warmup, sums); });
}

void scm_loss_backward(const at::Tensor (&inputs)[5], const at::Tensor& coef,
                       const at::Tensor& scale, at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(inputs[0].scalar_type(), "scm_loss_backward",
                            [&] { backward_impl<scalar_t>(inputs, coef, scale, out); });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
