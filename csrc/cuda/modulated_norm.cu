// Modulated LayerNorm / RMSNorm (adaLN): y = (xhat * w + b) * (1 + scale) + shift, its VJP and its JVP.
// Math: fastgen_kernels/ops/modulated_norm.py. Launch API and conventions: launch.h.
//
// A row lives in registers: thread t of a block owns the 16-byte vectors t, t + blockDim.x, ...
// (VPT of them, coalesced) of each row it processes, so the statistics take two passes over
// registers and x is read once.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace fastgen {
namespace cuda {
namespace {

// The most vectors per thread a row of kMaxDim elements needs at kMaxThreads threads: the
// backward's largest VPT (16-bit vectors never need more than one per thread there).
template <int VEC>
constexpr int kMaxVpt = static_cast<int>(ceil_div(kMaxDim, int64_t{VEC} * kMaxThreads));

// The forward's largest VPT: up to 16 elements a thread (more spill at the 64 registers that
// __launch_bounds__(kMaxThreads) leaves, on sm_90), or what a row of kMaxDim needs.
template <int VEC>
constexpr int kMaxForwardVpt = std::max(std::min(16 / VEC, 8), kMaxVpt<VEC>);

// Threads per row the kernels aim for. Blocks that work on one row at a time cover the memory's
// latency only with enough of them resident: the bytes in flight on an SM are their rows. A row
// spread over all the threads it could have (e.g. 288 for DiT's 1152 fp32 columns) leaves 7
// forward blocks resident (3 backward ones, by registers); at most 128 threads holding several
// vectors each leave about 14 (6), issue several independent loads a thread and reduce over
// fewer warps. (Occupancy arithmetic; to be measured: bench/bench_modulated_norm.py's graphed rows.)
constexpr int64_t kThreadsPerRow = 128;

struct RowTiling {
  int vpt;      // vectors per thread
  int threads;  // a multiple of the warp size, at most kMaxThreads
};

// The smallest VPT in {1, 2, 4, 8} that splits a row of `num_vecs` vectors over at most `target`
// threads without passing max_vpt, then over at most kMaxThreads in any case.
inline RowTiling row_tiling(int64_t num_vecs, int max_vpt, int64_t target) {
  int vpt = 1;
  while (vpt < max_vpt && ceil_div(num_vecs, vpt) > target) vpt *= 2;
  while (ceil_div(num_vecs, vpt) > kMaxThreads) vpt *= 2;
  const int threads = static_cast<int>(ceil_div(ceil_div(num_vecs, vpt), kWarpSize)) * kWarpSize;
  return {vpt, threads};
}

// Calls f(IntTag<VPT>{}) with VPT = vpt, instantiating only VPT <= MAX_VPT.
template <int MAX_VPT, int VPT = 1, typename F>
cudaError_t dispatch_vpt(int vpt, F&& f) {
  if constexpr (VPT < MAX_VPT) {
    if (vpt > VPT) return dispatch_vpt<MAX_VPT, 2 * VPT>(vpt, f);
  }
  return f(IntTag<VPT>{});
}

// Column of the i-th vector this thread owns in a row; it owns it when the column is < dim.
template <int VEC>
__device__ __forceinline__ int owned_col(int i) {
  return (threadIdx.x + i * blockDim.x) * VEC;
}

// One block per row. out is O: T, or narrower (dispatch_dtype_operand_vec), the dtype of the linear
// layer that reads it (autocast's), so that no cast follows.
template <typename T, typename O, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads) modulated_norm_forward_kernel(
    const T* __restrict__ x,       // (rows, dim)
    const T* __restrict__ shift,   // (rows, dim) if shift_per_token else (B, dim)
    const T* __restrict__ scale,   // (rows, dim) if scale_per_token else (B, dim)
    const T* __restrict__ weight,  // (dim,) or nullptr
    const T* __restrict__ bias,    // (dim,) or nullptr
    O* __restrict__ out,           // (rows, dim)
    float* __restrict__ mean,      // (rows,); nullptr when rms
    float* __restrict__ rstd,      // (rows,)
    int64_t tokens, int dim, bool shift_per_token, bool scale_per_token, bool rms, float eps) {
  const int64_t row = blockIdx.x;
  const int64_t offset = row * dim;
  const float inv_dim = 1.f / dim;

  float xv[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = owned_col<VEC>(i);
    if (col < dim) {
      load_vec(x + offset + col, xv[i]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[i][j] = 0.f;  // adds nothing to the sums below
    }
  }

  float mu = 0.f;
  if (!rms) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += xv[i][j];
    }
    mu = block_reduce_sum(sum) * inv_dim;
  }
  // Second pass over the registers: mean((x - mu)^2) without E[x^2] - E[x]^2 cancellation.
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (owned_col<VEC>(i) < dim) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = xv[i][j] - mu;
        sum_sq += d * d;
      }
    }
  }
  const float rs = rsqrtf(block_reduce_sum(sum_sq) * inv_dim + eps);
  if (threadIdx.x == 0) {
    if (!rms) mean[row] = mu;
    rstd[row] = rs;
  }

  const T* shift_row = shift + (shift_per_token ? row : row / tokens) * dim;
  const T* scale_row = scale + (scale_per_token ? row : row / tokens) * dim;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = owned_col<VEC>(i);
    if (col >= dim) continue;
    float w[VEC], b[VEC], sh[VEC], sc[VEC], y[VEC];
    load_vec_or(weight, col, 1.f, w);
    load_vec_or(bias, col, 0.f, b);
    load_vec(shift_row + col, sh);
    load_vec(scale_row + col, sc);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float n = (xv[i][j] - mu) * rs * w[j] + b[j];
      y[j] = n * (1.f + sc[j]) + sh[j];
    }
    store_vec(out + offset + col, y);
  }
}

// One block per chunk of rows (see launch.h). Per row it writes dx, and dshift / dscale when they
// are per token. Per owned column it sums over the chunk's rows, in registers, what the partials
// of dweight, dbias and a per-batch dshift / dscale need, and writes those once at the end. The
// modulation layouts are template parameters so that each variant keeps only the sums it needs:
// 8 values per thread at 1024 threads leave 64 registers, which a third sum would overflow.
// grad_out is G: T, or narrower (the gradient of a linear layer's input under autocast).
template <typename T, typename G, int VEC, int VPT, bool kShiftPerToken, bool kScalePerToken>
__global__ void __launch_bounds__(kMaxThreads) modulated_norm_backward_kernel(
    const G* __restrict__ grad_out,  // (rows, dim)
    const T* __restrict__ x,         // (rows, dim)
    const T* __restrict__ scale,     // (rows, dim) if kScalePerToken else (B, dim)
    const T* __restrict__ weight,    // (dim,) or nullptr
    const T* __restrict__ bias,      // (dim,) or nullptr
    const float* __restrict__ mean,  // (rows,); nullptr when rms
    const float* __restrict__ rstd,  // (rows,)
    T* __restrict__ dx,              // (rows, dim)
    T* __restrict__ dshift,          // (rows, dim) if kShiftPerToken else nullptr
    T* __restrict__ dscale,          // (rows, dim) if kScalePerToken else nullptr
    float* __restrict__ partials,    // (4, gridDim.x, dim), slots as in PartialSlot
    int64_t tokens, int dim, int64_t rows_per_chunk, int64_t chunks_per_batch, bool rms) {
  const ChunkRows chunk = chunk_rows(blockIdx.x, tokens, rows_per_chunk, chunks_per_batch);
  const float inv_dim = 1.f / dim;

  // With gs = gn = g * (1 + scale) for a per-token scale, else gs = g, the chunk's sums
  //   sum_gs_xhat = sum(gs * xhat), sum_gs = sum(gs), sum_g = sum(g) (only when kSumG)
  // give every partial, since w, b and a per-batch scale are constant over a chunk:
  //   dweight = m * sum_gs_xhat, dbias = m * sum_gs, where m = 1 + scale if per batch, else 1;
  //   dshift = sum(g), which is sum_gs when gs = g, else sum_g;
  //   per-batch dscale = sum(g * n) = w * sum_gs_xhat + b * sum_gs.
  constexpr bool kSumG = kScalePerToken && !kShiftPerToken;
  float sum_gs_xhat[VPT][VEC] = {}, sum_gs[VPT][VEC] = {}, sum_g[VPT][VEC] = {};

  for (int64_t row = chunk.begin; row < chunk.end; ++row) {
    const int64_t offset = row * dim;
    const T* scale_row = scale + (kScalePerToken ? row : chunk.batch) * dim;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];

    float gx[VPT][VEC] = {}, xhat[VPT][VEC] = {};
    float sums[2] = {0.f, 0.f};  // sum(gx), sum(gx * xhat) over the row
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int col = owned_col<VEC>(i);
      if (col >= dim) continue;
      float g[VEC], xv[VEC], sc[VEC], w[VEC];
      load_vec(grad_out + offset + col, g);
      load_vec(x + offset + col, xv);
      load_vec(scale_row + col, sc);
      load_vec_or(weight, col, 1.f, w);  // re-read per row (L1 hits): registers go to the sums
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[i][j] = (xv[j] - mu) * rs;
        const float gn = g[j] * (1.f + sc[j]);
        const float gs = kScalePerToken ? gn : g[j];
        gx[i][j] = gn * w[j];
        sums[0] += gx[i][j];
        sums[1] += gx[i][j] * xhat[i][j];
        sum_gs_xhat[i][j] += gs * xhat[i][j];
        sum_gs[i][j] += gs;
        if constexpr (kSumG) sum_g[i][j] += g[j];
      }
      if constexpr (kShiftPerToken) store_vec(dshift + offset + col, g);
      if constexpr (kScalePerToken) {
        float b[VEC];
        load_vec_or(bias, col, 0.f, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] *= xhat[i][j] * w[j] + b[j];  // dscale = g * n
        store_vec(dscale + offset + col, g);
      }
    }

    block_reduce_sum(sums);
    const float mean_gx = rms ? 0.f : sums[0] * inv_dim;
    const float mean_gx_xhat = sums[1] * inv_dim;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int col = owned_col<VEC>(i);
      if (col >= dim) continue;
      float d[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] = rs * (gx[i][j] - mean_gx - xhat[i][j] * mean_gx_xhat);
      store_vec(dx + offset + col, d);
    }
  }

  const int64_t slot_stride = int64_t{gridDim.x} * dim;
  float* chunk_partials = partials + int64_t{blockIdx.x} * dim;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = owned_col<VEC>(i);
    if (col >= dim) continue;
    float m[VEC], out[VEC];
    if constexpr (kScalePerToken) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] = 1.f;
    } else {
      load_vec(scale + chunk.batch * dim + col, m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] += 1.f;
    }
    if (weight != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = m[j] * sum_gs_xhat[i][j];
      store_vec(chunk_partials + kSlotWeight * slot_stride + col, out);
    }
    if (bias != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = m[j] * sum_gs[i][j];
      store_vec(chunk_partials + kSlotBias * slot_stride + col, out);
    }
    if constexpr (!kShiftPerToken) {
      store_vec(chunk_partials + kSlotShift * slot_stride + col, kSumG ? sum_g[i] : sum_gs[i]);
    }
    if constexpr (!kScalePerToken) {
      float w[VEC], b[VEC];
      load_vec_or(weight, col, 1.f, w);
      load_vec_or(bias, col, 0.f, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = w[j] * sum_gs_xhat[i][j] + b[j] * sum_gs[i][j];
      store_vec(chunk_partials + kSlotScale * slot_stride + col, out);
    }
  }
}

// One block per row, as the forward: x and tx live in registers (each read once), and the two row
// sums the tangent of xhat needs take one block reduction. No tx (kHasTx false): no sums at all.
// out is O as in the forward (the tangent feeds the same linear layer as y).
template <typename T, typename O, int VEC, int VPT, bool kHasTx>
__global__ void __launch_bounds__(kMaxThreads) modulated_norm_jvp_kernel(
    const T* __restrict__ x,        // (rows, dim)
    const T* __restrict__ scale,    // (rows, dim) if scale_per_token else (B, dim)
    const T* __restrict__ weight,   // (dim,) or nullptr
    const T* __restrict__ bias,     // (dim,) or nullptr
    const float* __restrict__ mean, // (rows,); nullptr when rms
    const float* __restrict__ rstd, // (rows,)
    const T* __restrict__ tx,       // (rows, dim) when kHasTx
    const T* __restrict__ tshift,   // (rows, dim) if tshift_per_token else (B, dim); or nullptr
    const T* __restrict__ tscale,   // (rows, dim) if tscale_per_token else (B, dim); or nullptr
    const T* __restrict__ tweight,  // (dim,) or nullptr
    const T* __restrict__ tbias,    // (dim,) or nullptr
    O* __restrict__ ty,             // (rows, dim)
    int64_t tokens, int dim, bool scale_per_token, bool tshift_per_token, bool tscale_per_token,
    bool rms) {
  const int64_t row = blockIdx.x;
  const int64_t batch = row / tokens;
  const int64_t offset = row * dim;
  const float mu = rms ? 0.f : mean[row];
  const float rs = rstd[row];

  float xhat[VPT][VEC], txv[VPT][VEC];
  float sums[2] = {0.f, 0.f};  // sum(tx), sum(tx * xhat) over the row
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = owned_col<VEC>(i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xhat[i][j] = txv[i][j] = 0.f;
    if (col >= dim) continue;
    load_vec(x + offset + col, xhat[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xhat[i][j] = (xhat[i][j] - mu) * rs;
    if constexpr (kHasTx) {
      load_vec(tx + offset + col, txv[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sums[0] += txv[i][j];
        sums[1] += txv[i][j] * xhat[i][j];
      }
    }
  }
  if constexpr (kHasTx) block_reduce_sum(sums);
  const float mean_tx = rms ? 0.f : sums[0] / dim;
  const float mean_tx_xhat = sums[1] / dim;

  const T* scale_row = scale + (scale_per_token ? row : batch) * dim;
  const T* tshift_row = tshift == nullptr ? nullptr : tshift + (tshift_per_token ? row : batch) * dim;
  const T* tscale_row = tscale == nullptr ? nullptr : tscale + (tscale_per_token ? row : batch) * dim;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int col = owned_col<VEC>(i);
    if (col >= dim) continue;
    float w[VEC], b[VEC], sc[VEC], tw[VEC], tb[VEC], tsh[VEC], tsc[VEC], out[VEC];
    load_vec_or(weight, col, 1.f, w);
    load_vec_or(bias, col, 0.f, b);
    load_vec(scale_row + col, sc);
    load_vec_or(tweight, col, 0.f, tw);
    load_vec_or(tbias, col, 0.f, tb);
    load_vec_or(tshift_row, col, 0.f, tsh);
    load_vec_or(tscale_row, col, 0.f, tsc);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float txhat = kHasTx ? rs * (txv[i][j] - mean_tx - xhat[i][j] * mean_tx_xhat) : 0.f;
      const float tn = txhat * w[j] + xhat[i][j] * tw[j] + tb[j];
      out[j] = tn * (1.f + sc[j]) + (xhat[i][j] * w[j] + b[j]) * tsc[j] + tsh[j];
    }
    store_vec(ty + offset + col, out);
  }
}

}  // namespace

cudaError_t launch_modulated_norm_forward(const ModulatedNormForwardArgs& args,
                                          cudaStream_t stream) {
  if (!valid_rows(args.rows, args.tokens, args.dim) || args.dim > kMaxDim ||
      args.rows > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype_operand_vec(
      args.dtype, args.out_dtype, args.dim, {args.x, args.shift, args.scale, args.weight, args.bias, args.out},
      [&](auto type_tag, auto out_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        using O = typename decltype(out_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        const RowTiling tiling = row_tiling(args.dim / VEC, kMaxForwardVpt<VEC>, kThreadsPerRow);
        return dispatch_vpt<kMaxForwardVpt<VEC>>(tiling.vpt, [&](auto vpt_tag) {
          constexpr int VPT = decltype(vpt_tag)::value;
          modulated_norm_forward_kernel<T, O, VEC, VPT>
              <<<static_cast<unsigned>(args.rows), tiling.threads, 0, stream>>>(
                  static_cast<const T*>(args.x), static_cast<const T*>(args.shift),
                  static_cast<const T*>(args.scale), static_cast<const T*>(args.weight),
                  static_cast<const T*>(args.bias), static_cast<O*>(args.out), args.mean,
                  args.rstd, args.tokens, static_cast<int>(args.dim), args.shift_per_token,
                  args.scale_per_token, args.rms, args.eps);
          return cudaGetLastError();
        });
      });
}

cudaError_t launch_modulated_norm_backward(const ModulatedNormBackwardArgs& args,
                                           cudaStream_t stream) {
  if (!valid_rows(args.rows, args.tokens, args.dim) || args.dim > kMaxDim ||
      !valid_chunks(args.rows, args.tokens, args.rows_per_chunk, args.chunks_per_batch)) {
    return cudaErrorInvalidValue;
  }
  const auto num_chunks = static_cast<unsigned>(args.rows / args.tokens * args.chunks_per_batch);
  return dispatch_dtype_operand_vec(
      args.dtype, args.grad_dtype, args.dim,
      {args.grad_out, args.x, args.scale, args.weight, args.bias, args.dx, args.dshift,
       args.dscale, args.partials},
      [&](auto type_tag, auto grad_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        using G = typename decltype(grad_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        // at most kMaxVpt vectors a thread (two at fp32, one at 16 bits): it holds five sums a vector
        const RowTiling tiling = row_tiling(args.dim / VEC, kMaxVpt<VEC>, kThreadsPerRow);
        return dispatch_vpt<kMaxVpt<VEC>>(tiling.vpt, [&](auto vpt_tag) {
          return dispatch_bool(args.shift_per_token, [&](auto shift_tag) {
            return dispatch_bool(args.scale_per_token, [&](auto scale_tag) {
              modulated_norm_backward_kernel<T, G, VEC, decltype(vpt_tag)::value,
                                             decltype(shift_tag)::value, decltype(scale_tag)::value>
                  <<<num_chunks, tiling.threads, 0, stream>>>(
                      static_cast<const G*>(args.grad_out), static_cast<const T*>(args.x),
                      static_cast<const T*>(args.scale), static_cast<const T*>(args.weight),
                      static_cast<const T*>(args.bias), args.mean, args.rstd,
                      static_cast<T*>(args.dx), static_cast<T*>(args.dshift),
                      static_cast<T*>(args.dscale), args.partials, args.tokens,
                      static_cast<int>(args.dim), args.rows_per_chunk, args.chunks_per_batch,
                      args.rms);
              return cudaGetLastError();
            });
          });
        });
      });
}

cudaError_t launch_modulated_norm_jvp(const ModulatedNormJvpArgs& args, cudaStream_t stream) {
  if (!valid_rows(args.rows, args.tokens, args.dim) || args.dim > kMaxDim || args.rows > INT32_MAX ||
      (args.tweight != nullptr && args.weight == nullptr) || (args.tbias != nullptr && args.bias == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype_operand_vec(
      args.dtype, args.out_dtype, args.dim,
      {args.x, args.scale, args.weight, args.bias, args.tx, args.tshift, args.tscale, args.tweight, args.tbias,
       args.ty},
      [&](auto type_tag, auto out_tag, auto vec_tag) {
        using T = typename decltype(type_tag)::type;
        using O = typename decltype(out_tag)::type;
        constexpr int VEC = decltype(vec_tag)::value;
        // the backward's tiling: two row arrays a thread (x and tx), as its x and gradient
        const RowTiling tiling = row_tiling(args.dim / VEC, kMaxVpt<VEC>, kThreadsPerRow);
        return dispatch_vpt<kMaxVpt<VEC>>(tiling.vpt, [&](auto vpt_tag) {
          return dispatch_bool(args.tx != nullptr, [&](auto has_tx) {
            modulated_norm_jvp_kernel<T, O, VEC, decltype(vpt_tag)::value, decltype(has_tx)::value>
                <<<static_cast<unsigned>(args.rows), tiling.threads, 0, stream>>>(
                    static_cast<const T*>(args.x), static_cast<const T*>(args.scale),
                    static_cast<const T*>(args.weight), static_cast<const T*>(args.bias), args.mean, args.rstd,
                    static_cast<const T*>(args.tx), static_cast<const T*>(args.tshift),
                    static_cast<const T*>(args.tscale), static_cast<const T*>(args.tweight),
                    static_cast<const T*>(args.tbias), static_cast<O*>(args.ty), args.tokens,
                    static_cast<int>(args.dim), args.scale_per_token, args.tshift_per_token,
                    args.tscale_per_token, args.rms);
            return cudaGetLastError();
          });
        });
      });
}

}  // namespace cuda
}  // namespace fastgen
