// The per-sample tails of the fused losses on the CPU (formulas: sample_loss_tail.h): one serial
// pass over the batch, which is tiny next to the reduction before it, summing the batch in index
// order for "mean" (in fp64).
#include "cpu/common.h"
#include "ops.h"

namespace fastgen {
namespace cpu {

void sample_loss_tail(const LossTailArgs& args, const at::Tensor& sums, const at::Tensor* weight,
                      const at::Tensor* t, const at::Tensor* logvar, bool mean, at::Tensor& loss,
                      at::Tensor& saved) {
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "sample_loss_tail", [&] {
    const int64_t batch = sums.size(0), width = sums.size(1), saved_width = saved.size(1);
    const scalar_t* s = sums.const_data_ptr<scalar_t>();
    const scalar_t* w = weight ? weight->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* tt = t ? t->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* u = logvar ? logvar->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    scalar_t* kept = saved.mutable_data_ptr<scalar_t>();
    double total = 0;  // fp32 would stop counting at 2^24 equal terms (a batch mean of large B)
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t value = loss_tail<scalar_t>(args, s + b * width, w ? w[b] : scalar_t(1), tt ? tt[b] : scalar_t(0),
                                                 u ? u[b] : scalar_t(0), kept + b * saved_width);
      if (mean) {
        total += value;
      } else {
        out[b] = value;
      }
    }
    if (mean) out[0] = static_cast<scalar_t>(total / static_cast<double>(batch));
  });
}

}  // namespace cpu
}  // namespace fastgen
