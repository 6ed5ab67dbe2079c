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
    A sq_sum = 0;
#pragma omp simd reduction(+ : sq_sum)
    for (int64_t i = begin; i < end; ++i) {
      const A d = static_cast<A>(pp[i]) - static_cast<A>(tp[i]);
      sq_sum += d * d;
    }
    acc[0] += sq_sum;
  });
}

}  // namespace

void denoising_loss_sums(const at::Tensor& pred, const at::Tensor& target, at::Tensor& sums) {
  FASTGEN_DISPATCH_FLOATING(pred.scalar_type(), "denoising_loss_sums",
                            [&] { sums_impl<scalar_t>(pred, target, sums); });
}

}  // namespace cpu
}  // namespace fastgen
