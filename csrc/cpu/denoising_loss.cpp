// Denoising (score-matching) loss on the CPU: one pass over pred and target producing the
// per-sample sum S = sum (pred - target)^2 (math: fastgen_kernels/ops/denoising_loss.py). The
// backward is the shared sample_scaled_difference.
#include "cpu/sample_reduce.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace {

template <typename T>
void sums_impl(const at::Tensor& pred, const at::Tensor& target, at::Tensor& sums) {
  using A = acc_t<T>;
  const T* pp = pred.const_data_ptr<T>();
  const T* tp = target.const_data_ptr<T>();
  const int64_t batch = pred.size(0);
  sample_chunk_sums<1, A>(batch, pred.numel() / batch, sums, [&](int64_t begin, int64_t end, A (&acc)[1]) {
    lane_sums<1, A>(begin, end, acc, [&](int64_t i, A (&t)[1]) {
      const A d = static_cast<A>(pp[i]) - static_cast<A>(tp[i]);
      t[0] = d * d;
    });
  });
}

}  // namespace

void denoising_loss_sums(const at::Tensor& pred, const at::Tensor& target, at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(pred.scalar_type(), "denoising_loss_sums",
                            [&] { sums_impl<scalar_t>(pred, target, sums); });
}

}  // namespace cpu
}  // namespace fastgen
