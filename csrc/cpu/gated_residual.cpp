// Gated residual x + gate * y on the CPU: one pass, rows in parallel. Backward: one pass writing dy
// and the gate's gradient, summed over each chunk of rows for a per-batch gate (deterministic).
#include "cpu/common.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace {

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t tokens = x.size(1), dim = x.size(2), rows = x.size(0) * tokens;
  const bool per_token = gate.dim() == 3;
  const T* xp = x.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  const T* gp = gate.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * dim;
      const T* yr = yp + r * dim;
      const T* gr = mod_row(gp, r, tokens, per_token, dim);
      T* o = op + r * dim;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c)
        o[c] = static_cast<T>(static_cast<A>(xr[c]) + static_cast<A>(gr[c]) * static_cast<A>(yr[c]));
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gate,
                   RowChunks chunks, at::Tensor& dy, at::Tensor& dgate, at::Tensor& partials) {
  using A = acc_t<T>;
  const int64_t tokens = y.size(1), dim = y.size(2);
  const int64_t num_chunks = y.size(0) * chunks.chunks_per_batch;
  const bool per_token = gate.dim() == 3;
  const T* gop = grad_out.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  const T* gp = gate.const_data_ptr<T>();
  T* dyp = dy.mutable_data_ptr<T>();
  T* dgp = per_token ? dgate.mutable_data_ptr<T>() : nullptr;
  A* partp = per_token ? nullptr : partials.mutable_data_ptr<A>();
  at::parallel_for(0, num_chunks, chunk_grain(dim, chunks.rows_per_chunk), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* part = partp ? partp + chunk * dim : nullptr;
      if (part) std::fill(part, part + dim, A(0));
      int64_t first, last;
      chunk_rows(chunk, tokens, chunks, first, last);
      for (int64_t r = first; r < last; ++r) {
        const T* g = gop + r * dim;
        const T* yr = yp + r * dim;
        const T* gr = mod_row(gp, r, tokens, per_token, dim);
        T* dyr = dyp + r * dim;
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c)
          dyr[c] = static_cast<T>(static_cast<A>(g[c]) * static_cast<A>(gr[c]));
        if (part) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) part[c] += static_cast<A>(g[c]) * static_cast<A>(yr[c]);
        } else {
          T* dgr = dgp + r * dim;
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c)
            dgr[c] = static_cast<T>(static_cast<A>(g[c]) * static_cast<A>(yr[c]));
        }
      }
    }
  });
}

}  // namespace

void gated_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                            at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "gated_residual_forward",
                            [&] { forward_impl<scalar_t>(x, y, gate, out); });
}

void gated_residual_backward(const at::Tensor& grad_out, const at::Tensor& y,
                             const at::Tensor& gate, RowChunks chunks, at::Tensor& dy,
                             at::Tensor& dgate, at::Tensor& partials) {
  FASTGEN_DISPATCH_FLOATING(y.scalar_type(), "gated_residual_backward",
                            [&] { backward_impl<scalar_t>(grad_out, y, gate, chunks, dy, dgate, partials); });
}

}  // namespace cpu
}  // namespace fastgen
