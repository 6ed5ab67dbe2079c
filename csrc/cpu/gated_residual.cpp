// Gated residual x + gate * y (+ gate2 * y2, the JVP's second term) on the CPU: one pass, rows in
// parallel. Backward: one pass writing dy and the gate's gradient, summed over each chunk of rows
// for a per-batch gate (deterministic). x, out and grad_out are T; y, gate (y2, gate2, dy, dgate)
// are U: T, or fp16/bf16 with fp32 T (autocast's operands on an fp32 residual stream), read as
// they are.
#include "cpu/common.h"
#include "cpu/convert.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

template <typename T, typename U>
void forward_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor* y2,
                  const at::Tensor* gate2, at::Tensor& out) {
  const int64_t tokens = x.size(1), dim = x.size(2), rows = x.size(0) * tokens;
  const bool per_token = gate.dim() == 3, per_token2 = gate2 && gate2->dim() == 3;
  const T* xp = x.const_data_ptr<T>();
  const U* yp = y.const_data_ptr<U>();
  const U* gp = gate.const_data_ptr<U>();
  const U* y2p = y2 ? y2->const_data_ptr<U>() : nullptr;
  const U* g2p = gate2 ? gate2->const_data_ptr<U>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * dim;
      const U* yr = yp + r * dim;
      const U* gr = mod_row(gp, r, tokens, per_token, dim);
      T* o = op + r * dim;
      if (y2p) {
        const U* y2r = y2p + r * dim;
        const U* g2r = mod_row(g2p, r, tokens, per_token2, dim);
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c)
          o[c] = from_acc<T>(to_acc(xr[c]) + to_acc(gr[c]) * to_acc(yr[c]) + to_acc(g2r[c]) * to_acc(y2r[c]));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c)
          o[c] = from_acc<T>(to_acc(xr[c]) + to_acc(gr[c]) * to_acc(yr[c]));
      }
    }
  });
}

template <typename T, typename U>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gate,
                   RowChunks chunks, at::Tensor& dy, at::Tensor& dgate, at::Tensor& partials) {
  using A = acc_t<T>;
  const int64_t tokens = y.size(1), dim = y.size(2);
  const int64_t num_chunks = y.size(0) * chunks.chunks_per_batch;
  const bool per_token = gate.dim() == 3;
  const T* gop = grad_out.const_data_ptr<T>();
  const U* yp = y.const_data_ptr<U>();
  const U* gp = gate.const_data_ptr<U>();
  U* dyp = dy.mutable_data_ptr<U>();
  U* dgp = per_token ? dgate.mutable_data_ptr<U>() : nullptr;
  A* partp = per_token ? nullptr : partials.mutable_data_ptr<A>();
  at::parallel_for(0, num_chunks, chunk_grain(dim, chunks.rows_per_chunk), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* part = partp ? partp + chunk * dim : nullptr;
      if (part) std::fill(part, part + dim, A(0));
      int64_t first, last;
      chunk_rows(chunk, tokens, chunks, first, last);
      for (int64_t r = first; r < last; ++r) {
        const T* g = gop + r * dim;
        const U* yr = yp + r * dim;
        const U* gr = mod_row(gp, r, tokens, per_token, dim);
        U* dyr = dyp + r * dim;
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c)
          dyr[c] = from_acc<U>(to_acc(g[c]) * to_acc(gr[c]));
        if (part) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) part[c] += to_acc(g[c]) * to_acc(yr[c]);
        } else {
          U* dgr = dgp + r * dim;
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c)
            dgr[c] = from_acc<U>(to_acc(g[c]) * to_acc(yr[c]));
        }
      }
    }
  });
}

}  // namespace

void gated_residual_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor* y2,
                            const at::Tensor* gate2, at::Tensor& out) {
  dispatch_dtype_pair(x.scalar_type(), y.scalar_type(), "gated_residual_forward", [&](auto t, auto u) {
    forward_impl<decltype(t), decltype(u)>(x, y, gate, y2, gate2, out);
  });
}

void gated_residual_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gate,
                             RowChunks chunks, at::Tensor& dy, at::Tensor& dgate, at::Tensor& partials) {
  dispatch_dtype_pair(grad_out.scalar_type(), y.scalar_type(), "gated_residual_backward", [&](auto t, auto u) {
    backward_impl<decltype(t), decltype(u)>(grad_out, y, gate, chunks, dy, dgate, partials);
  });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
