// QK-norm + rotary embedding: per-head RMSNorm of q or k, then RoPE, its VJP and its JVP.
// Math: fastgen_kernels/ops/qk_norm_rope.py. Launch API and conventions: launch.h.
//
// One warp per head vector (dim <= kMaxHeadDim = 256). Lane t owns the rotary pairs t, t + 32, ...
// (at most kPairsPerLane), so a pair and its rotation stay in one thread's registers and the sums
// over the row are one warp reduction each. Accesses are scalar; the lanes of a warp touch
// consecutive pairs, so they coalesce.
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastgen {
namespace cuda {
namespace {

constexpr int kPairsPerLane = static_cast<int>(ceil_div(ceil_div(kMaxHeadDim, 2), kWarpSize));
constexpr int kForwardWarps = 8;    // rows per forward block, one per warp
constexpr int kBackwardWarps = 16;  // warps per backward block; the block owns one chunk of rows

// The rotary pair layout, compiled in. kNone (no rotary) tiles the head as kInterleaved does,
// which also covers an odd dim (the last pair has no second entry).
enum class Rope : int { kNone, kInterleaved, kHalf };
template <Rope R>
using RopeTag = std::integral_constant<Rope, R>;

template <typename F>
cudaError_t dispatch_rope(bool has_rope, bool interleaved, F&& f) {
  if (!has_rope) return f(RopeTag<Rope::kNone>{});
  if (interleaved) return f(RopeTag<Rope::kInterleaved>{});
  return f(RopeTag<Rope::kHalf>{});
}

// This lane's values of one head, as pairs: a[k], b[k] hold pair lane + 32 k.
struct Pairs {
  float a[kPairsPerLane];
  float b[kPairsPerLane];
};

// Columns (a, b) of pair p, and whether the pair exists; b < dim tells whether its second does.
template <Rope ROPE>
__device__ __forceinline__ bool pair_cols(int p, int dim, int& a, int& b) {
  if constexpr (ROPE == Rope::kHalf) {
    a = p;
    b = p + dim / 2;
  } else {
    a = 2 * p;
    b = a + 1;
  }
  return p < (dim + 1) / 2;
}

// Reads this lane's pairs of row[0..dim) as fp32; `fill` where row is null (absent weight), 0 for
// entries beyond dim.
template <Rope ROPE, typename T>
__device__ __forceinline__ Pairs load_pairs(const T* row, int dim, float fill = 0.f) {
  const int lane = threadIdx.x % kWarpSize;
  Pairs v;
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    int a, b;
    const bool owned = pair_cols<ROPE>(lane + k * kWarpSize, dim, a, b);
    v.a[k] = !owned ? 0.f : row == nullptr ? fill : to_float(row[a]);
    v.b[k] = !owned || b >= dim ? 0.f : row == nullptr ? fill : to_float(row[b]);
  }
  return v;
}

template <Rope ROPE, typename T>
__device__ __forceinline__ void store_pairs(T* row, int dim, const Pairs& v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    int a, b;
    if (!pair_cols<ROPE>(lane + k * kWarpSize, dim, a, b)) continue;
    row[a] = from_float<T>(v.a[k]);
    if (b < dim) row[b] = from_float<T>(v.b[k]);
  }
}

// Rotates this lane's pairs of one head in place: v = v * cos + rot(v) * sin, rot(a, b) = (-b, a),
// or with TRANSPOSE the rotation's VJP v = v * cos - rot(v * sin). cos, sin: the head's token row.
template <Rope ROPE, bool TRANSPOSE>
__device__ __forceinline__ void rotate(Pairs& v, const float* cos, const float* sin, int dim) {
  const Pairs c = load_pairs<ROPE>(cos, dim);
  const Pairs s = load_pairs<ROPE>(sin, dim);
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    const float a = v.a[k], b = v.b[k];
    if constexpr (TRANSPOSE) {
      v.a[k] = a * c.a[k] + b * s.b[k];
      v.b[k] = b * c.b[k] - a * s.a[k];
    } else {
      v.a[k] = a * c.a[k] - b * s.a[k];
      v.b[k] = b * c.b[k] + a * s.b[k];
    }
  }
}

// Offset of head vector `row` = (b * tokens + l) * heads + h in the strided x, and its token l.
struct HeadRow {
  int64_t offset, token;
};

__device__ __forceinline__ HeadRow head_row(int64_t row, int64_t tokens, int64_t heads,
                                            int64_t stride_b, int64_t stride_l, int64_t stride_h) {
  const int64_t bl = row / heads;
  const int64_t token = bl % tokens;
  return {(bl / tokens) * stride_b + token * stride_l + (row - bl * heads) * stride_h, token};
}

// One warp per row.
template <typename T, Rope ROPE>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize) qk_norm_rope_forward_kernel(
    const T* __restrict__ x,        // (B, tokens, heads, dim), strided
    const T* __restrict__ weight,   // (dim,) or nullptr
    const float* __restrict__ cos,  // (tokens, dim); unused when ROPE == kNone
    const float* __restrict__ sin,  // (tokens, dim); unused when ROPE == kNone
    T* __restrict__ out,            // (rows, dim)
    float* __restrict__ rstd,       // (rows,)
    int64_t rows, int64_t tokens, int64_t heads, int dim, int64_t stride_b, int64_t stride_l,
    int64_t stride_h, float eps) {
  const int64_t row = int64_t{blockIdx.x} * kForwardWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // the whole warp leaves: the shuffles below see every lane
  const HeadRow head = head_row(row, tokens, heads, stride_b, stride_l, stride_h);
  Pairs n = load_pairs<ROPE>(x + head.offset, dim);
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) sum_sq += n.a[k] * n.a[k] + n.b[k] * n.b[k];
  const float rs = rsqrtf(warp_reduce_sum(sum_sq) / dim + eps);
  if (threadIdx.x % kWarpSize == 0) rstd[row] = rs;
  const Pairs w = load_pairs<ROPE>(weight, dim, 1.f);
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    n.a[k] *= rs * w.a[k];
    n.b[k] *= rs * w.b[k];
  }
  if constexpr (ROPE != Rope::kNone) {
    rotate<ROPE, false>(n, cos + head.token * dim, sin + head.token * dim, dim);
  }
  store_pairs<ROPE>(out + row * dim, dim, n);
}

// One block per chunk of rows (launch.h); its warps take the chunk's rows in turn. Each lane sums
// dn * xhat for its pairs over its warp's rows in registers; the block adds the warps' sums in a
// fixed order through shared memory and writes the chunk's partial sums: no atomics.
template <typename T, Rope ROPE>
__global__ void __launch_bounds__(kBackwardWarps * kWarpSize) qk_norm_rope_backward_kernel(
    const T* __restrict__ grad_out,  // (rows, dim)
    const T* __restrict__ x,         // (B, tokens, heads, dim), strided
    const T* __restrict__ weight,    // (dim,) or nullptr
    const float* __restrict__ cos,   // (tokens, dim); unused when ROPE == kNone
    const float* __restrict__ sin,   // (tokens, dim); unused when ROPE == kNone
    const float* __restrict__ rstd,  // (rows,)
    T* __restrict__ dx,              // (rows, dim)
    float* __restrict__ partials,    // (gridDim.x, dim) when weight, else nullptr
    int64_t rows, int64_t tokens, int64_t heads, int dim, int64_t stride_b, int64_t stride_l,
    int64_t stride_h, int64_t rows_per_chunk, int64_t num_chunks) {
  __shared__ float warp_sums[kBackwardWarps][kMaxHeadDim];
  const int warp = threadIdx.x / kWarpSize;
  const ChunkRows chunk = chunk_rows(blockIdx.x, rows, rows_per_chunk, num_chunks);
  const Pairs w = load_pairs<ROPE>(weight, dim, 1.f);
  Pairs acc = {};  // sum over this warp's rows of dn * xhat

  for (int64_t row = chunk.begin + warp; row < chunk.end; row += kBackwardWarps) {
    const HeadRow head = head_row(row, tokens, heads, stride_b, stride_l, stride_h);
    Pairs dn = load_pairs<ROPE>(grad_out + row * dim, dim);
    Pairs xhat = load_pairs<ROPE>(x + head.offset, dim);
    if constexpr (ROPE != Rope::kNone) {  // dn = g * cos - rot(g * sin)
      rotate<ROPE, true>(dn, cos + head.token * dim, sin + head.token * dim, dim);
    }
    const float rs = rstd[row];
    float sum_gx_xhat = 0.f;
#pragma unroll
    for (int k = 0; k < kPairsPerLane; ++k) {
      xhat.a[k] *= rs;
      xhat.b[k] *= rs;
      sum_gx_xhat += dn.a[k] * w.a[k] * xhat.a[k] + dn.b[k] * w.b[k] * xhat.b[k];
    }
    const float proj = warp_reduce_sum(sum_gx_xhat) / dim;
    Pairs d;
#pragma unroll
    for (int k = 0; k < kPairsPerLane; ++k) {
      d.a[k] = rs * (dn.a[k] * w.a[k] - xhat.a[k] * proj);
      d.b[k] = rs * (dn.b[k] * w.b[k] - xhat.b[k] * proj);
      acc.a[k] += dn.a[k] * xhat.a[k];
      acc.b[k] += dn.b[k] * xhat.b[k];
    }
    store_pairs<ROPE>(dx + row * dim, dim, d);
  }

  if (partials == nullptr) return;  // the same for every thread of the block
  store_pairs<ROPE>(warp_sums[warp], dim, acc);
  __syncthreads();
  for (int col = threadIdx.x; col < dim; col += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kBackwardWarps; ++i) sum += warp_sums[i][col];
    partials[int64_t{blockIdx.x} * dim + col] = sum;
  }
}

// One warp per row, as the forward. Without tx (kHasTx false) the tangent is xhat * tweight
// rotated, and no sum is taken.
template <typename T, Rope ROPE, bool kHasTx>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize) qk_norm_rope_jvp_kernel(
    const T* __restrict__ x,        // (B, tokens, heads, dim), strided
    const T* __restrict__ weight,   // (dim,) or nullptr
    const float* __restrict__ cos,  // (tokens, dim); unused when ROPE == kNone
    const float* __restrict__ sin,  // (tokens, dim); unused when ROPE == kNone
    const float* __restrict__ rstd, // (rows,)
    const T* __restrict__ tx,       // (B, tokens, heads, dim) at the tx strides, when kHasTx
    const T* __restrict__ tweight,  // (dim,) or nullptr
    T* __restrict__ out,            // (rows, dim)
    int64_t rows, int64_t tokens, int64_t heads, int dim, int64_t stride_b, int64_t stride_l,
    int64_t stride_h, int64_t tx_stride_b, int64_t tx_stride_l, int64_t tx_stride_h) {
  const int64_t row = int64_t{blockIdx.x} * kForwardWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // the whole warp leaves: the shuffles below see every lane
  const HeadRow head = head_row(row, tokens, heads, stride_b, stride_l, stride_h);
  const float rs = rstd[row];
  Pairs xhat = load_pairs<ROPE>(x + head.offset, dim);
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    xhat.a[k] *= rs;
    xhat.b[k] *= rs;
  }
  const Pairs tw = load_pairs<ROPE>(tweight, dim);  // 0 without a tweight
  Pairs t = {};
  if constexpr (kHasTx) {  // rstd (tx - xhat mean(tx xhat)) * weight
    t = load_pairs<ROPE>(tx + head_row(row, tokens, heads, tx_stride_b, tx_stride_l, tx_stride_h).offset, dim);
    const Pairs w = load_pairs<ROPE>(weight, dim, 1.f);
    float sum_tx_xhat = 0.f;
#pragma unroll
    for (int k = 0; k < kPairsPerLane; ++k) sum_tx_xhat += t.a[k] * xhat.a[k] + t.b[k] * xhat.b[k];
    const float proj = warp_reduce_sum(sum_tx_xhat) / dim;
#pragma unroll
    for (int k = 0; k < kPairsPerLane; ++k) {
      t.a[k] = rs * (t.a[k] - xhat.a[k] * proj) * w.a[k];
      t.b[k] = rs * (t.b[k] - xhat.b[k] * proj) * w.b[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kPairsPerLane; ++k) {
    t.a[k] += xhat.a[k] * tw.a[k];
    t.b[k] += xhat.b[k] * tw.b[k];
  }
  if constexpr (ROPE != Rope::kNone) {
    rotate<ROPE, false>(t, cos + head.token * dim, sin + head.token * dim, dim);
  }
  store_pairs<ROPE>(out + row * dim, dim, t);
}

// rows = B * tokens * heads with every count positive, and dim within the kernels' limit (even
// with rotary).
bool valid_heads(int64_t rows, int64_t tokens, int64_t heads, int64_t dim, bool has_rope) {
  return rows >= 1 && tokens >= 1 && heads >= 1 && dim >= 1 && dim <= kMaxHeadDim &&
         rows % (tokens * heads) == 0 && (!has_rope || dim % 2 == 0);
}

}  // namespace

cudaError_t launch_qk_norm_rope_forward(const QkNormRopeForwardArgs& args, cudaStream_t stream) {
  const bool has_rope = args.cos != nullptr;
  if (!valid_heads(args.rows, args.tokens, args.heads, args.dim, has_rope) ||
      has_rope != (args.sin != nullptr) || ceil_div(args.rows, kForwardWarps) > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned>(ceil_div(args.rows, kForwardWarps));
  return dispatch_dtype(args.dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    return dispatch_rope(has_rope, args.interleaved, [&](auto rope_tag) {
      qk_norm_rope_forward_kernel<T, decltype(rope_tag)::value>
          <<<blocks, kForwardWarps * kWarpSize, 0, stream>>>(
              static_cast<const T*>(args.x), static_cast<const T*>(args.weight), args.cos,
              args.sin, static_cast<T*>(args.out), args.rstd, args.rows, args.tokens, args.heads,
              static_cast<int>(args.dim), args.stride_b, args.stride_l, args.stride_h, args.eps);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_qk_norm_rope_backward(const QkNormRopeBackwardArgs& args, cudaStream_t stream) {
  const bool has_rope = args.cos != nullptr;
  if (!valid_heads(args.rows, args.tokens, args.heads, args.dim, has_rope) ||
      has_rope != (args.sin != nullptr) || (args.weight != nullptr) != (args.partials != nullptr) ||
      !valid_chunks(args.rows, args.rows, args.rows_per_chunk, args.num_chunks)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(args.dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    return dispatch_rope(has_rope, args.interleaved, [&](auto rope_tag) {
      qk_norm_rope_backward_kernel<T, decltype(rope_tag)::value>
          <<<static_cast<unsigned>(args.num_chunks), kBackwardWarps * kWarpSize, 0, stream>>>(
              static_cast<const T*>(args.grad_out), static_cast<const T*>(args.x),
              static_cast<const T*>(args.weight), args.cos, args.sin, args.rstd,
              static_cast<T*>(args.dx), args.partials, args.rows, args.tokens, args.heads,
              static_cast<int>(args.dim), args.stride_b, args.stride_l, args.stride_h,
              args.rows_per_chunk, args.num_chunks);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_qk_norm_rope_jvp(const QkNormRopeJvpArgs& args, cudaStream_t stream) {
  const bool has_rope = args.cos != nullptr;
  if (!valid_heads(args.rows, args.tokens, args.heads, args.dim, has_rope) ||
      has_rope != (args.sin != nullptr) || ceil_div(args.rows, kForwardWarps) > INT32_MAX ||
      (args.tx == nullptr && args.tweight == nullptr) || (args.tweight != nullptr && args.weight == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const auto blocks = static_cast<unsigned>(ceil_div(args.rows, kForwardWarps));
  return dispatch_dtype(args.dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    return dispatch_rope(has_rope, args.interleaved, [&](auto rope_tag) {
      return dispatch_bool(args.tx != nullptr, [&](auto has_tx) {
        qk_norm_rope_jvp_kernel<T, decltype(rope_tag)::value, decltype(has_tx)::value>
            <<<blocks, kForwardWarps * kWarpSize, 0, stream>>>(
                static_cast<const T*>(args.x), static_cast<const T*>(args.weight), args.cos, args.sin,
                args.rstd, static_cast<const T*>(args.tx), static_cast<const T*>(args.tweight),
                static_cast<T*>(args.out), args.rows, args.tokens, args.heads, static_cast<int>(args.dim),
                args.stride_b, args.stride_l, args.stride_h, args.tx_stride_b, args.tx_stride_l,
                args.tx_stride_h);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cuda
}  // namespace fastgen
