// Modulated LayerNorm / RMSNorm on the CPU, forward, backward and the forward-mode tangent: one
// read of each input and one write of each output per row, rows in parallel (at::parallel_for).
// The math is derived in fastgen_kernels/ops/modulated_norm.py.
//
// Each row is converted once into an fp32 (fp64) buffer that stays in L1, so the statistics are an
// exact two-pass mean and variance without re-reading x from memory. The loops over D are written
// so the compiler vectorizes them (`omp simd` for the reductions).
#include <cmath>
#include <vector>

#include "cpu/common.h"
#include "cpu/convert.h"
#include "cpu/norm_jacobian.h"
#include "ops.h"

namespace fastgen {
namespace cpu {
namespace FASTGEN_CPU_ISA {
namespace {

// Loads row x[0:D) into buf; returns (mean, rstd), mean = 0 for RMSNorm.
template <typename T, typename A>
inline void row_stats(const T* x, A* buf, int64_t dim, A eps, bool rms, A& mean, A& rstd) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < dim; ++c) {
    buf[c] = to_acc(x[c]);
    sum += buf[c];
  }
  mean = rms ? A(0) : sum / static_cast<A>(dim);
  A sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < dim; ++c) {
    const A d = buf[c] - mean;
    sq += d * d;
  }
  rstd = A(1) / std::sqrt(sq / static_cast<A>(dim) + eps);
}

// y = (xhat * w + b) * (1 + scale) + shift, written as O; HAS_W / HAS_B compile the affine terms
// away.
template <bool HAS_W, bool HAS_B, typename T, typename O, typename A>
inline void write_row(const A* buf, A mean, A rstd, const T* w, const T* b, const T* shift,
                      const T* scale, O* y, int64_t dim) {
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) {
    A n = (buf[c] - mean) * rstd;
    if constexpr (HAS_W) n *= to_acc(w[c]);
    if constexpr (HAS_B) n += to_acc(b[c]);
    y[c] = from_acc<O>(n * (A(1) + to_acc(scale[c])) + to_acc(shift[c]));
  }
}

// out is O: T, or narrower (the dtype of the linear layer that reads it, autocast's).
template <typename T, typename O, bool HAS_W, bool HAS_B>
void forward_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                  const T* w, const T* b, double eps, bool rms, at::Tensor& out, at::Tensor& mean,
                  at::Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t tokens = x.size(1), dim = x.size(2), rows = x.size(0) * tokens;
  const bool shift_per_token = shift.dim() == 3, scale_per_token = scale.dim() == 3;
  const T* xp = x.const_data_ptr<T>();
  const T* shp = shift.const_data_ptr<T>();
  const T* scp = scale.const_data_ptr<T>();
  O* yp = out.mutable_data_ptr<O>();
  A* meanp = rms ? nullptr : mean.mutable_data_ptr<A>();
  A* rstdp = rstd.mutable_data_ptr<A>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(dim);
    for (int64_t r = begin; r < end; ++r) {
      A mu, rs;
      row_stats(xp + r * dim, buf.data(), dim, static_cast<A>(eps), rms, mu, rs);
      if (meanp) meanp[r] = mu;
      rstdp[r] = rs;
      write_row<HAS_W, HAS_B>(buf.data(), mu, rs, w, b,
                              mod_row(shp, r, tokens, shift_per_token, dim),
                              mod_row(scp, r, tokens, scale_per_token, dim), yp + r * dim, dim);
    }
  });
}

// grad_out is G: T, or narrower (the gradient of a linear layer's input under autocast).
template <typename T, typename G, bool HAS_W, bool HAS_B>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x, bool shift_per_token,
                   const at::Tensor& scale, const T* w, const T* b, const at::Tensor& mean,
                   const at::Tensor& rstd, bool rms, RowChunks chunks, at::Tensor& dx,
                   at::Tensor& dshift, at::Tensor& dscale, at::Tensor& partials) {
  using A = acc_t<T>;
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  const int64_t num_chunks = batch * chunks.chunks_per_batch;
  const bool scale_per_token = scale.dim() == 3;
  const G* gp = grad_out.const_data_ptr<G>();
  const T* xp = x.const_data_ptr<T>();
  const T* scp = scale.const_data_ptr<T>();
  const A* meanp = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rstdp = rstd.const_data_ptr<A>();
  T* dxp = dx.mutable_data_ptr<T>();
  T* dshiftp = shift_per_token ? dshift.mutable_data_ptr<T>() : nullptr;
  T* dscalep = scale_per_token ? dscale.mutable_data_ptr<T>() : nullptr;
  A* partp = partials.mutable_data_ptr<A>();
  at::parallel_for(0, num_chunks, chunk_grain(dim, chunks.rows_per_chunk), [&](int64_t begin, int64_t end) {
    std::vector<A> xhat_buf(dim), gn_buf(dim), gx_buf(dim);
    A* xhat = xhat_buf.data();
    A* gn = gn_buf.data();  // grad_out * (1 + scale), the gradient of the affine output
    A* gx = gx_buf.data();  // gn * weight, the gradient of xhat
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      // This chunk's partial sums; null where that gradient is not reduced over rows.
      auto slot = [&](int s, bool used) -> A* {
        if (!used) return nullptr;
        A* p = partp + (s * num_chunks + chunk) * dim;
        std::fill(p, p + dim, A(0));
        return p;
      };
      A* pw = slot(kSlotWeight, HAS_W);
      A* pb = slot(kSlotBias, HAS_B);
      A* pshift = slot(kSlotShift, !shift_per_token);
      A* pscale = slot(kSlotScale, !scale_per_token);
      int64_t first, last;
      chunk_rows(chunk, tokens, chunks, first, last);
      for (int64_t r = first; r < last; ++r) {
        const G* g = gp + r * dim;
        const T* xr = xp + r * dim;
        const T* sc = mod_row(scp, r, tokens, scale_per_token, dim);
        const A mu = meanp ? meanp[r] : A(0), rs = rstdp[r];
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) {
          xhat[c] = (to_acc(xr[c]) - mu) * rs;
          gn[c] = to_acc(g[c]) * (A(1) + to_acc(sc[c]));
          gx[c] = HAS_W ? gn[c] * to_acc(w[c]) : gn[c];
        }
        // dx; its sums over fp32 only (fused with the loads above, GCC left the loop scalar for
        // half-precision weights: about 5 of 12 ms for bf16 at 8x1024x1152)
        apply_norm_jacobian(gx, xhat, rs, rms, dim, dxp + r * dim);
        // Parameter and modulation gradients, per token or summed into this chunk's partials: a
        // loop each, with the choice outside, so that every one vectorizes.
        if constexpr (HAS_W) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) pw[c] += gn[c] * xhat[c];
        }
        if constexpr (HAS_B) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) pb[c] += gn[c];
        }
        if (pshift) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) pshift[c] += to_acc(g[c]);
        } else {
          T* dshiftr = dshiftp + r * dim;
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) dshiftr[c] = from_acc<T>(to_acc(g[c]));
        }
        // scale's gradient: grad_out times the affine output n = xhat * weight + bias (in xhat)
        if constexpr (HAS_W || HAS_B) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) {
            if constexpr (HAS_W) xhat[c] *= to_acc(w[c]);
            if constexpr (HAS_B) xhat[c] += to_acc(b[c]);
          }
        }
        if (pscale) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) pscale[c] += to_acc(g[c]) * xhat[c];
        } else {
          T* dscaler = dscalep + r * dim;
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) dscaler[c] = from_acc<T>(to_acc(g[c]) * xhat[c]);
        }
      }
    }
  });
}

// The tangent of y given tangents of the inputs (nullptr = zero), written as O; the forward's
// statistics give xhat. With tn the tangent of the affine output n = xhat * w + b:
//   tn = rstd * (tx - mean(tx) - xhat * mean(tx * xhat)) * w + xhat * tw + tb
//   ty = tn * (1 + scale) + n * tscale + tshift
// Each term is a loop of its own over fp32 row buffers (absent tangents are skipped, not zeros),
// so every loop vectorizes and the input's tangent is read once.
template <typename T, typename O, bool HAS_W, bool HAS_B>
void jvp_impl(const at::Tensor& x, const at::Tensor& scale, const T* w, const T* b, const at::Tensor& mean,
              const at::Tensor& rstd, bool rms, const T* txp, const at::Tensor* tshift,
              const at::Tensor* tscale, const T* tw, const T* tb, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t tokens = x.size(1), dim = x.size(2), rows = x.size(0) * tokens;
  const bool scale_per_token = scale.dim() == 3;
  const bool tshift_per_token = tshift && tshift->dim() == 3, tscale_per_token = tscale && tscale->dim() == 3;
  const T* xp = x.const_data_ptr<T>();
  const T* scp = scale.const_data_ptr<T>();
  const T* tshp = data_or_null<T>(tshift);
  const T* tscp = data_or_null<T>(tscale);
  const A* meanp = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rstdp = rstd.const_data_ptr<A>();
  O* yp = out.mutable_data_ptr<O>();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<A> xhat_buf(dim), t_buf(dim);
    A* xhat = xhat_buf.data();
    A* t = t_buf.data();  // tn, then ty
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * dim;
      const A mu = meanp ? meanp[r] : A(0), rs = rstdp[r];
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) xhat[c] = (to_acc(xr[c]) - mu) * rs;
      if (txp) {
        const T* txr = txp + r * dim;
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) t[c] = to_acc(txr[c]);
        apply_norm_jacobian(t, xhat, rs, rms, dim, t);  // xhat's tangent
        if constexpr (HAS_W) {
#pragma omp simd
          for (int64_t c = 0; c < dim; ++c) t[c] *= to_acc(w[c]);
        }
      } else {
        std::fill(t, t + dim, A(0));
      }
      if (tw) {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) t[c] += xhat[c] * to_acc(tw[c]);
      }
      if (tb) {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) t[c] += to_acc(tb[c]);
      }
      const T* sc = mod_row(scp, r, tokens, scale_per_token, dim);
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) t[c] *= A(1) + to_acc(sc[c]);
      if (tscp) {
        const T* tsc = mod_row(tscp, r, tokens, tscale_per_token, dim);
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) {
          A n = xhat[c];
          if constexpr (HAS_W) n *= to_acc(w[c]);
          if constexpr (HAS_B) n += to_acc(b[c]);
          t[c] += n * to_acc(tsc[c]);
        }
      }
      O* yr = yp + r * dim;
      if (tshp) {
        const T* tsh = mod_row(tshp, r, tokens, tshift_per_token, dim);
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) yr[c] = from_acc<O>(t[c] + to_acc(tsh[c]));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) yr[c] = from_acc<O>(t[c]);
      }
    }
  });
}

// Calls F<HAS_W, HAS_B>() for the given presence of weight and bias.
template <typename F>
void with_affine(bool has_w, bool has_b, F&& f) {
  if (has_w && has_b) f(std::true_type{}, std::true_type{});
  else if (has_w) f(std::true_type{}, std::false_type{});
  else if (has_b) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

}  // namespace

void modulated_norm_forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                            const at::Tensor* weight, const at::Tensor* bias, double eps, bool rms,
                            at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  dispatch_dtype_pair(x.scalar_type(), out.scalar_type(), "modulated_norm_forward", [&](auto t, auto o) {
    using T = decltype(t);
    with_affine(weight, bias, [&](auto has_w, auto has_b) {
      forward_impl<T, decltype(o), decltype(has_w)::value, decltype(has_b)::value>(
          x, shift, scale, data_or_null<T>(weight), data_or_null<T>(bias), eps, rms, out, mean, rstd);
    });
  });
}

void modulated_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, bool shift_per_token,
                             const at::Tensor& scale, const at::Tensor* weight,
                             const at::Tensor* bias, const at::Tensor& mean,
                             const at::Tensor& rstd, bool rms, RowChunks chunks, at::Tensor& dx,
                             at::Tensor& dshift, at::Tensor& dscale, at::Tensor& partials) {
  dispatch_dtype_pair(x.scalar_type(), grad_out.scalar_type(), "modulated_norm_backward", [&](auto t, auto g) {
    using T = decltype(t);
    with_affine(weight, bias, [&](auto has_w, auto has_b) {
      backward_impl<T, decltype(g), decltype(has_w)::value, decltype(has_b)::value>(
          grad_out, x, shift_per_token, scale, data_or_null<T>(weight), data_or_null<T>(bias), mean, rstd, rms,
          chunks, dx, dshift, dscale, partials);
    });
  });
}

void modulated_norm_jvp(const at::Tensor& x, const at::Tensor& scale, const at::Tensor* weight,
                        const at::Tensor* bias, const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                        const at::Tensor* tx, const at::Tensor* tshift, const at::Tensor* tscale,
                        const at::Tensor* tweight, const at::Tensor* tbias, at::Tensor& out) {
  dispatch_dtype_pair(x.scalar_type(), out.scalar_type(), "modulated_norm_jvp", [&](auto t, auto o) {
    using T = decltype(t);
    with_affine(weight, bias, [&](auto has_w, auto has_b) {
      jvp_impl<T, decltype(o), decltype(has_w)::value, decltype(has_b)::value>(
          x, scale, data_or_null<T>(weight), data_or_null<T>(bias), mean, rstd, rms, data_or_null<T>(tx), tshift,
          tscale, data_or_null<T>(tweight), data_or_null<T>(tbias), out);
    });
  });
}

}  // namespace FASTGEN_CPU_ISA
}  // namespace cpu
}  // namespace fastgen
