// QK-norm + rotary embedding on the CPU: per-head RMSNorm, then RoPE, for one of q, k. The math is
// derived in fastgen_kernels/ops/qk_norm_rope.py.
//
// Forward (and the forward-mode tangent, alike): head vectors (rows) in parallel; each is
// converted once into an fp32 (fp64) buffer that stays in L1, normalized there, then rotated into
// the output. Backward: one task per chunk of rows
// (row_chunks over all B*L*H rows as one batch) writes dx for its rows and sums the weight's
// gradient into its own partial-sum row: deterministic whatever the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/convert.h"
#include "cpu/norm_jacobian.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

enum class Rope { kNone, kInterleaved, kHalf };
template <Rope R>
using RopeTag = std::integral_constant<Rope, R>;

// Where the head vectors of x (B, L, H, Dh) are: row = (b * L + l) * H + h.
struct HeadRows {
  int64_t tokens, heads, stride_b, stride_l, stride_h;

  explicit HeadRows(const at::Tensor& x)
      : tokens(x.size(1)), heads(x.size(2)), stride_b(x.stride(0)), stride_l(x.stride(1)),
        stride_h(x.stride(2)) {}
  int64_t offset(int64_t row) const {
    const int64_t bl = row / heads;
    return (bl / tokens) * stride_b + (bl % tokens) * stride_l + (row % heads) * stride_h;
  }
  int64_t token(int64_t row) const { return (row / heads) % tokens; }
};

// out = v * cos + rot(v) * sin over the rotary pairs (a, b) of one head, or with TRANSPOSE
// out = v * cos + rot^T(v * sin) = v * cos - rot(v * sin), the rotation's VJP.
template <Rope ROPE, bool TRANSPOSE, typename In, typename A, typename Out>
inline void rotate(const In* v, const A* cos, const A* sin, int64_t dim, Out* out) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t p = 0; p < half; ++p) {
    const int64_t a = ROPE == Rope::kInterleaved ? 2 * p : p;
    const int64_t b = ROPE == Rope::kInterleaved ? a + 1 : a + half;
    const A va = to_acc(v[a]), vb = to_acc(v[b]);
    if constexpr (TRANSPOSE) {
      out[a] = from_acc<Out>(va * cos[a] + vb * sin[b]);
      out[b] = from_acc<Out>(vb * cos[b] - va * sin[a]);
    } else {
      out[a] = from_acc<Out>(va * cos[a] - vb * sin[a]);
      out[b] = from_acc<Out>(vb * cos[b] + va * sin[b]);
    }
  }
}

// Writes a head's values v, rounded to T, to y: rotated with its token's tables, or as they are
// without rotary (the forward's output and its tangent alike).
template <Rope ROPE, typename A, typename T>
inline void store_head(const A* v, const A* cos, const A* sin, int64_t token, int64_t dim, T* y) {
  if constexpr (ROPE == Rope::kNone) {
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) y[c] = from_acc<T>(v[c]);
  } else {
    rotate<ROPE, false>(v, cos + token * dim, sin + token * dim, dim, y);
  }
}

template <typename T, bool HAS_W, Rope ROPE>
void forward_impl(const at::Tensor& x, const T* w, const acc_t<T>* cos, const acc_t<T>* sin,
                  double eps, at::Tensor& out, at::Tensor& rstd) {
  using A = acc_t<T>;
  const HeadRows heads(x);
  const int64_t dim = x.size(3), rows = x.size(0) * x.size(1) * x.size(2);
  const T* xp = x.const_data_ptr<T>();
  T* yp = out.mutable_data_ptr<T>();
  A* rstdp = rstd.mutable_data_ptr<A>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<A> n(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + heads.offset(r);
      A sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < dim; ++c) {
        n[c] = to_acc(xr[c]);
        sq += n[c] * n[c];
      }
      const A rs = A(1) / std::sqrt(sq / static_cast<A>(dim) + static_cast<A>(eps));
      rstdp[r] = rs;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) {
        n[c] *= rs;
        if constexpr (HAS_W) n[c] *= to_acc(w[c]);
      }
      store_head<ROPE>(n.data(), cos, sin, heads.token(r), dim, yp + r * dim);
    }
  });
}

template <typename T, bool HAS_W, Rope ROPE>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, const T* w,
                   const acc_t<T>* cos, const acc_t<T>* sin, const at::Tensor& rstd,
                   RowChunks chunks, at::Tensor& dx, at::Tensor& partials) {
  using A = acc_t<T>;
  const HeadRows heads(x);
  const int64_t dim = x.size(3), rows = x.size(0) * x.size(1) * x.size(2);
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const A* rstdp = rstd.const_data_ptr<A>();
  T* dxp = dx.mutable_data_ptr<T>();
  A* partp = HAS_W ? partials.mutable_data_ptr<A>() : nullptr;
  at::parallel_for(0, chunks.chunks_per_batch, chunk_grain(dim, chunks.rows_per_chunk), [&](int64_t begin, int64_t end) {
    std::vector<A> xhat(dim), dn(dim), gx(dim);  // gx = dn * weight, the gradient of xhat
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* pw = HAS_W ? partp + chunk * dim : nullptr;
      if constexpr (HAS_W) std::fill(pw, pw + dim, A(0));
      int64_t first, last;
      chunk_rows(chunk, rows, chunks, first, last);
      for (int64_t r = first; r < last; ++r) {
        const T* g = gp + r * dim;
        const T* xr = xp + heads.offset(r);
        const A rs = rstdp[r];
        if constexpr (ROPE == Rope::kNone) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) dn[c] = to_acc(g[c]);
        } else {
          const int64_t table = heads.token(r) * dim;
          rotate<ROPE, true>(g, cos + table, sin + table, dim, dn.data());
        }
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) {
          xhat[c] = to_acc(xr[c]) * rs;
          gx[c] = HAS_W ? dn[c] * to_acc(w[c]) : dn[c];
        }
        // The sum in a loop of its own, over fp32 only: fused with the loads above, GCC leaves the
        // loop scalar for half-precision weights. (Not apply_norm_jacobian: the weight's gradient
        // rides in the same loop as dx.)
        A sum_gx_xhat = 0;
#pragma omp simd reduction(+ : sum_gx_xhat)
        for (int64_t c = 0; c < dim; ++c) sum_gx_xhat += gx[c] * xhat[c];
        const A proj = sum_gx_xhat / static_cast<A>(dim);
        T* dxr = dxp + r * dim;
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) {
          dxr[c] = from_acc<T>(rs * (gx[c] - xhat[c] * proj));
          if constexpr (HAS_W) pw[c] += dn[c] * xhat[c];
        }
      }
    }
  });
}

// The tangent of out given tangents of x (its own head strides; nullptr = zero) and of the weight
// (nullptr = zero):
//   tn = rstd * (tx - xhat * mean(tx * xhat)) * w + xhat * tw,   tout = tn * cos + rot(tn) * sin
template <typename T, bool HAS_W, Rope ROPE>
void jvp_impl(const at::Tensor& x, const T* w, const acc_t<T>* cos, const acc_t<T>* sin,
              const at::Tensor& rstd, const at::Tensor* tx, const T* tw, at::Tensor& out) {
  using A = acc_t<T>;
  const HeadRows heads(x);
  const HeadRows tangent_heads(tx ? *tx : x);
  const int64_t dim = x.size(3), rows = x.size(0) * x.size(1) * x.size(2);
  const T* xp = x.const_data_ptr<T>();
  const T* txp = data_or_null<T>(tx);
  const A* rstdp = rstd.const_data_ptr<A>();
  T* yp = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<A> xhat(dim), tn(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + heads.offset(r);
      const A rs = rstdp[r];
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) xhat[c] = to_acc(xr[c]) * rs;
      if (txp) {
        const T* txr = txp + tangent_heads.offset(r);
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) tn[c] = to_acc(txr[c]);
        apply_norm_jacobian(tn.data(), xhat.data(), rs, /*rms=*/true, dim, tn.data());  // xhat's tangent
        if constexpr (HAS_W) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) tn[c] *= to_acc(w[c]);
        }
      } else {
        std::fill(tn.begin(), tn.end(), A(0));
      }
      if (tw) {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) tn[c] += xhat[c] * to_acc(tw[c]);
      }
      store_head<ROPE>(tn.data(), cos, sin, heads.token(r), dim, yp + r * dim);
    }
  });
}

// Calls f(HAS_W tag, RopeTag) for the presence of the weight and the rotary layout.
template <typename F>
void with_variant(bool has_w, bool has_rope, bool interleaved, F&& f) {
  auto with_rope = [&](auto has_w_tag) {
    if (!has_rope) f(has_w_tag, RopeTag<Rope::kNone>{});
    else if (interleaved) f(has_w_tag, RopeTag<Rope::kInterleaved>{});
    else f(has_w_tag, RopeTag<Rope::kHalf>{});
  };
  if (has_w) with_rope(std::true_type{});
  else with_rope(std::false_type{});
}

}  // namespace

void qk_norm_rope_forward(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,
                          const at::Tensor* sin, double eps, bool interleaved, at::Tensor& out,
                          at::Tensor& rstd) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "qk_norm_rope_forward", [&] {
    using A = acc_t<scalar_t>;
    with_variant(weight, cos, interleaved, [&](auto has_w, auto rope) {
      forward_impl<scalar_t, decltype(has_w)::value, decltype(rope)::value>(
          x, data_or_null<scalar_t>(weight), data_or_null<A>(cos), data_or_null<A>(sin), eps, out,
          rstd);
    });
  });
}

void qk_norm_rope_backward(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor* weight, const at::Tensor* cos, const at::Tensor* sin,
                           const at::Tensor& rstd, bool interleaved, RowChunks chunks,
                           at::Tensor& dx, at::Tensor& partials) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "qk_norm_rope_backward", [&] {
    using A = acc_t<scalar_t>;
    with_variant(weight, cos, interleaved, [&](auto has_w, auto rope) {
      backward_impl<scalar_t, decltype(has_w)::value, decltype(rope)::value>(
          grad_out, x, data_or_null<scalar_t>(weight), data_or_null<A>(cos), data_or_null<A>(sin),
          rstd, chunks, dx, partials);
    });
  });
}

void qk_norm_rope_jvp(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* cos,
                      const at::Tensor* sin, const at::Tensor& rstd, bool interleaved, const at::Tensor* tx,
                      const at::Tensor* tweight, at::Tensor& out) {
  FASTGEN_DISPATCH_FLOATING(x.scalar_type(), "qk_norm_rope_jvp", [&] {
    using A = acc_t<scalar_t>;
    with_variant(weight, cos, interleaved, [&](auto has_w, auto rope) {
      jvp_impl<scalar_t, decltype(has_w)::value, decltype(rope)::value>(
          x, data_or_null<scalar_t>(weight), data_or_null<A>(cos), data_or_null<A>(sin), rstd, tx,
          data_or_null<scalar_t>(tweight), out);
    });
  });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
