// The backward pass shared by the per-sample losses on the CPU: out = scale[b] * (a - b) for each
// element of sample b, and optionally its negation, in one pass (elements in parallel).
#include "cpu/common.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace {

template <typename T>
void scaled_difference_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                            at::Tensor& out, at::Tensor& negated) {
  using A = acc_t<T>;
  const int64_t batch = a.size(0), total = a.numel(), numel = total / batch;
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const A* sp = scale.const_data_ptr<A>();
  T* op = out.mutable_data_ptr<T>();
  T* np = negated.defined() ? negated.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, total, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {  // one run per sample within [begin, end)
      const int64_t sample = i / numel;
      const int64_t stop = std::min(end, (sample + 1) * numel);
      const A s = sp[sample];
      if (np) {
#pragma omp simd
        for (int64_t j = i; j < stop; ++j) {
          const A d = s * (static_cast<A>(ap[j]) - static_cast<A>(bp[j]));
          op[j] = static_cast<T>(d);
          np[j] = static_cast<T>(-d);
        }
      } else {
#pragma omp simd
        for (int64_t j = i; j < stop; ++j)
          op[j] = static_cast<T>(s * (static_cast<A>(ap[j]) - static_cast<A>(bp[j])));
      }
      i = stop;
    }
  });
}

}  // namespace

void sample_scaled_difference(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                              at::Tensor& out, at::Tensor& negated) {
  FASTGEN_DISPATCH_FLOATING(a.scalar_type(), "sample_scaled_difference",
                            [&] { scaled_difference_impl<scalar_t>(a, b, scale, out, negated); });
}

}  // namespace cpu
}  // namespace fastgen
