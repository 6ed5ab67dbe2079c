// VSD (DMD2) loss on the CPU: one pass over x_g, x0_teacher, x0_fake producing the per-sample sums
// S1 = sum |x_g - T| and S2 = sum (Fk - T)^2 (math: fastgen_kernels/ops/vsd_loss.py). The backward
// is the shared sample_scaled_difference.
#include <cmath>

#include "cpu/convert.h"
#include "cpu/sample_reduce.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

template <typename T>
void sums_impl(const at::Tensor& x_g, const at::Tensor& teacher, const at::Tensor& fake,
               at::Tensor& sums) {
  using A = acc_t<T>;
  const T* xp = x_g.const_data_ptr<T>();
  const T* tp = teacher.const_data_ptr<T>();
  const T* fp = fake.const_data_ptr<T>();
  const int64_t batch = x_g.size(0);
  sample_chunk_sums<2, A>(batch, x_g.numel() / batch, sums, [&](int64_t begin, int64_t end, A (&acc)[2]) {
    lane_sums<2, A>(begin, end, acc, [&](int64_t i, A (&s)[2]) {
      const A t = to_acc(tp[i]);
      const A d = to_acc(fp[i]) - t;
      s[0] = std::abs(to_acc(xp[i]) - t);
      s[1] = d * d;
    });
  });
}

}  // namespace

void vsd_loss_sums(const at::Tensor& x_g, const at::Tensor& teacher, const at::Tensor& fake,
                   at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(x_g.scalar_type(), "vsd_loss_sums",
                            [&] { sums_impl<scalar_t>(x_g, teacher, fake, sums); });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
