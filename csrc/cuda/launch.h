// Launch functions of the CUDA kernels: plain C++ on raw pointers, no torch headers, so the .cu
// files compile with nvcc alone (tests/test_build.py) and the torch glue stays in
// csrc/torch_bindings.cpp.
//
// Conventions shared by every kernel here:
// - Tensors are contiguous. x-like tensors are (rows, dim) with rows = B * tokens.
// - A modulation tensor (shift, scale, gate) is per token, (rows, dim), or per batch, (B, dim),
//   broadcast over the `tokens` rows of each batch.
// - Reads are 16-byte vectors when dim and every pointer allow it, scalar otherwise (fp16/bf16
//   operands beside fp32 ones move as 8-byte vectors of as many elements).
// - Arithmetic in fp32; statistics (mean, rstd) are fp32 arrays of length rows.
// - Backward reductions over rows are deterministic: the `tokens` rows of each batch are cut into
//   `chunks_per_batch` chunks of `rows_per_chunk` rows (the last may be shorter); one thread block
//   owns one chunk and writes its partial sums to partials[slot][chunk][dim] (fp32), which the
//   caller sums. No atomics.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../row_chunks.h"
#include "../sample_chunks.h"
#include "../sample_loss_tail.h"

namespace fastgen {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Widest dim the kernels take (a row lives in registers: at most 8 elements per thread at 1024
// threads). Callers fall back to another backend above it.
constexpr int64_t kMaxDim = 8192;

struct ModulatedNormForwardArgs {
  DType dtype;
  DType out_dtype;     // dtype, or fp16/bf16 with fp32 dtype (the reading layer's autocast dtype)
  const void* x;       // (rows, dim)
  const void* shift;   // (rows, dim) if shift_per_token else (B, dim)
  const void* scale;   // (rows, dim) if scale_per_token else (B, dim)
  const void* weight;  // (dim,) or nullptr
  const void* bias;    // (dim,) or nullptr (always nullptr when rms)
  void* out;           // (rows, dim), written
  float* mean;         // (rows,), written; nullptr when rms
  float* rstd;         // (rows,), written
  int64_t rows, tokens, dim;
  bool shift_per_token, scale_per_token, rms;
  float eps;
};

// y = ((x - mean) * rstd * weight + bias) * (1 + scale) + shift  (rms: mean = 0, no bias)
cudaError_t launch_modulated_norm_forward(const ModulatedNormForwardArgs& args, cudaStream_t stream);

struct ModulatedNormBackwardArgs {
  DType dtype;           // x, scale, weight, bias, dx, dshift, dscale
  DType grad_dtype;      // grad_out: dtype, or fp16/bf16 with fp32 dtype (a linear layer's under autocast)
  const void* grad_out;  // (rows, dim)
  const void* x;         // (rows, dim)
  const void* scale;     // (rows, dim) if scale_per_token else (B, dim)
  const void* weight;    // (dim,) or nullptr
  const void* bias;      // (dim,) or nullptr
  const float* mean;     // (rows,), nullptr when rms
  const float* rstd;     // (rows,)
  void* dx;              // (rows, dim), written
  void* dshift;          // (rows, dim) written when shift_per_token, else nullptr
  void* dscale;          // (rows, dim) written when scale_per_token, else nullptr
  float* partials;       // (4, num_chunks, dim): slot kSlotWeight if weight, kSlotBias if bias,
                         // kSlotShift if !shift_per_token, kSlotScale if !scale_per_token
  int64_t rows, tokens, dim, rows_per_chunk, chunks_per_batch;
  bool shift_per_token, scale_per_token, rms;
};

cudaError_t launch_modulated_norm_backward(const ModulatedNormBackwardArgs& args, cudaStream_t stream);

// The forward-mode tangent: each input's tangent optional (nullptr = zero) and of its primal's
// dtype and layout, except that tshift and tscale are per token or per batch on their own.
struct ModulatedNormJvpArgs {
  DType dtype;         // x, scale, weight, bias and the tangents
  DType out_dtype;     // ty: dtype, or fp16/bf16 with fp32 dtype (as the forward's out)
  const void* x;       // (rows, dim)
  const void* scale;   // (rows, dim) if scale_per_token else (B, dim)
  const void* weight;  // (dim,) or nullptr
  const void* bias;    // (dim,) or nullptr (always nullptr when rms)
  const float* mean;   // (rows,), nullptr when rms
  const float* rstd;   // (rows,)
  const void* tx;      // (rows, dim) or nullptr
  const void* tshift;  // (rows, dim) if tshift_per_token else (B, dim); or nullptr
  const void* tscale;  // (rows, dim) if tscale_per_token else (B, dim); or nullptr
  const void* tweight; // (dim,) or nullptr (nullptr when weight is)
  const void* tbias;   // (dim,) or nullptr (nullptr when bias is)
  void* ty;            // (rows, dim), written
  int64_t rows, tokens, dim;
  bool scale_per_token, tshift_per_token, tscale_per_token, rms;
};

// ty = (txhat * weight + xhat * tweight + tbias) * (1 + scale) + (xhat * weight + bias) * tscale
//      + tshift, with txhat = rstd * (tx - mean(tx) - xhat * mean(tx * xhat))  (rms: no mean(tx))
cudaError_t launch_modulated_norm_jvp(const ModulatedNormJvpArgs& args, cudaStream_t stream);

// The gated residual's operands (y, gate and the second term's) may be narrower than x, all of
// one operand_dtype: operand_dtype == dtype, or dtype fp32 with fp16/bf16 operands (autocast's
// outputs on an fp32 residual stream), read as they are instead of from widened copies.
struct GatedResidualForwardArgs {
  DType dtype;          // x and out
  DType operand_dtype;  // y, gate, y2, gate2
  const void* x;        // (rows, dim)
  const void* y;        // (rows, dim)
  const void* gate;     // (rows, dim) if gate_per_token else (B, dim)
  const void* y2;       // (rows, dim) or nullptr: a second term
  const void* gate2;    // like gate (its own gate2_per_token), nullptr exactly when y2 is
  void* out;            // (rows, dim), written: x + gate * y (+ gate2 * y2)
  int64_t rows, tokens, dim;
  bool gate_per_token, gate2_per_token;
};

cudaError_t launch_gated_residual_forward(const GatedResidualForwardArgs& args, cudaStream_t stream);

struct GatedResidualBackwardArgs {
  DType dtype;           // grad_out
  DType operand_dtype;   // y, gate, dy, dgate (as in the forward)
  const void* grad_out;  // (rows, dim)
  const void* y;         // (rows, dim)
  const void* gate;      // (rows, dim) if gate_per_token else (B, dim)
  void* dy;              // (rows, dim), written: grad_out * gate
  void* dgate;           // (rows, dim) written when gate_per_token (grad_out * y), else nullptr
  float* partials;       // (1, num_chunks, dim) when !gate_per_token: sum over the chunk's rows of
                         // grad_out * y; else nullptr
  int64_t rows, tokens, dim, rows_per_chunk, chunks_per_batch;
  bool gate_per_token;
};

cudaError_t launch_gated_residual_backward(const GatedResidualBackwardArgs& args, cudaStream_t stream);

// Widest head the QK-norm + rotary kernels take: one warp holds a head vector, at most 8 elements
// per lane. Callers fall back to another backend above it.
constexpr int64_t kMaxHeadDim = 256;

// QK-norm + rotary for one of q, k. x is (B, tokens, heads, dim) with contiguous head vectors at
// element strides (stride_b, stride_l, stride_h); its rows = B * tokens * heads head vectors are
// numbered row = (b * tokens + l) * heads + h, and every other (rows, ...) tensor is contiguous.
// Rotary pairs (a, b): (2i, 2i+1) when interleaved, (i, i + dim/2) otherwise; rot maps (a, b) to
// (-b, a). Without rotary (cos == nullptr) dim may be odd, else it must be even.
struct QkNormRopeForwardArgs {
  DType dtype;
  const void* x;       // (B, tokens, heads, dim), strided as above
  const void* weight;  // (dim,) or nullptr
  const float* cos;    // (tokens, dim) or nullptr (no rotary)
  const float* sin;    // (tokens, dim); nullptr exactly when cos is
  void* out;           // (rows, dim), written: n * cos + rot(n) * sin, n = x * rstd * weight
  float* rstd;         // (rows,), written
  int64_t rows, tokens, heads, dim, stride_b, stride_l, stride_h;
  bool interleaved;
  float eps;
};

cudaError_t launch_qk_norm_rope_forward(const QkNormRopeForwardArgs& args, cudaStream_t stream);

struct QkNormRopeBackwardArgs {
  DType dtype;
  const void* grad_out;  // (rows, dim)
  const void* x;         // (B, tokens, heads, dim), strided as in the forward
  const void* weight;    // (dim,) or nullptr
  const float* cos;      // (tokens, dim) or nullptr
  const float* sin;      // (tokens, dim) or nullptr
  const float* rstd;     // (rows,)
  void* dx;              // (rows, dim), written
  float* partials;       // (num_chunks, dim) when weight, else nullptr: per chunk of rows, the sum
                         // of dn * xhat (dn = grad_out * cos - rot(grad_out * sin))
  int64_t rows, tokens, heads, dim, stride_b, stride_l, stride_h;
  int64_t rows_per_chunk, num_chunks;  // the rows cut as one batch (row_chunks(1, rows))
  bool interleaved;
};

cudaError_t launch_qk_norm_rope_backward(const QkNormRopeBackwardArgs& args, cudaStream_t stream);

// The forward-mode tangent of the forward's out given the tangents of x and of the weight (each
// optional, not both absent): out = rot(rstd (tx - xhat mean(tx xhat)) * weight + xhat * tweight),
// rot the forward's rotary map (linear), xhat = x * rstd.
struct QkNormRopeJvpArgs {
  DType dtype;
  const void* x;        // (B, tokens, heads, dim), strided as in the forward
  const void* weight;   // (dim,) or nullptr
  const float* cos;     // (tokens, dim) or nullptr
  const float* sin;     // (tokens, dim) or nullptr
  const float* rstd;    // (rows,), the forward's
  const void* tx;       // (B, tokens, heads, dim) at the tx_stride_* strides, head vectors contiguous; or nullptr
  const void* tweight;  // (dim,) or nullptr (nullptr when weight is)
  void* out;            // (rows, dim), written
  int64_t rows, tokens, heads, dim, stride_b, stride_l, stride_h, tx_stride_b, tx_stride_l, tx_stride_h;
  bool interleaved;
};

cudaError_t launch_qk_norm_rope_jvp(const QkNormRopeJvpArgs& args, cudaStream_t stream);

// Per-sample losses. The inputs are B samples of `numel` contiguous elements each; a reduction
// writes fp32 sums (B, NSTAT), deterministically: one block per chunk of a sample (chunks of
// sample_chunks(B, numel), see sample_chunks.h) writes its partial sums to `partials`
// (B * chunks_per_sample, NSTAT), then one thread per sample adds them up in chunk order.
struct SampleReduceArgs {
  int64_t batch, numel, chunk_size, chunks_per_sample;
  float* partials;  // (batch * chunks_per_sample, NSTAT), scratch
  float* sums;      // (batch, NSTAT), written; nullptr: partials only
};

// The tail of a per-sample loss over the batch (sample_loss_tail.h), one block: loss[b] =
// loss_tail(sums[b], ...) and saved[b], or with mean loss[0] = sum_b loss_b / batch (a fixed-order
// block reduction: deterministic). sums may be the reduction's partial sums, chunks_per_sample rows
// per sample, which the tail adds in chunk order as the reduction's finish would.
struct SampleLossTailArgs {
  LossTailArgs tail;
  const float* sums;    // (batch * chunks_per_sample, tail_sums(kind))
  int64_t chunks_per_sample;
  const float* weight;  // (batch,) or nullptr (1)
  const float* t;       // (batch,) or nullptr (0)
  const float* logvar;  // (batch,) or nullptr (0)
  float* loss;          // (1,) when mean, else (batch,); written
  float* saved;         // (batch, tail_saved(kind)); written
  int64_t batch;
  bool mean;
};

cudaError_t launch_sample_loss_tail(const SampleLossTailArgs& args, cudaStream_t stream);

// sums[b] = (sum |x_g - teacher|, sum (fake - teacher)^2)
struct VsdLossSumsArgs {
  DType dtype;
  const void* x_g;      // (batch, numel)
  const void* teacher;  // (batch, numel)
  const void* fake;     // (batch, numel)
  SampleReduceArgs reduce;
};

cudaError_t launch_vsd_loss_sums(const VsdLossSumsArgs& args, cudaStream_t stream);

// sums[b] = sum r^2 over sample b, r = a - b + k[b] * c (c and k nullptr: r = a - b).
struct SquaredResidualSumsArgs {
  DType dtype;
  const void* a;   // (batch, numel)
  const void* b;   // (batch, numel)
  const void* c;   // (batch, numel) or nullptr
  const float* k;  // (batch,), nullptr with c
  SampleReduceArgs reduce;
};

cudaError_t launch_squared_residual_sums(const SquaredResidualSumsArgs& args, cudaStream_t stream);

// The per-sample scale of a loss's backward pass, s_b = factor[b * factor_stride] * g_b with
// g_b = grad[b * grad_stride] (grad_stride 0: a scalar upstream gradient; grad nullptr: g_b = 1):
// a column of the loss tail's saved factors times the upstream gradient, read by the kernel instead
// of a (B,) product launched before it.
struct SampleScale {
  const float* factor;
  int64_t factor_stride;
  const float* grad;
  int64_t grad_stride;
#ifdef __CUDACC__
  __device__ __forceinline__ float operator()(int64_t sample) const {
    const float f = factor[sample * factor_stride];
    return grad == nullptr ? f : f * grad[sample * grad_stride];
  }
#endif
};

// out = scale(b) * r, r as above; negated = -out when not nullptr. The backward of the squared
// residual and of the VSD loss.
struct ScaledResidualArgs {
  DType dtype;
  const void* a;        // (batch, numel)
  const void* b;        // (batch, numel)
  const void* c;        // (batch, numel) or nullptr
  const float* k;       // (batch,), nullptr with c
  SampleScale scale;
  void* out;            // (batch, numel), written
  void* negated;        // (batch, numel), written, or nullptr
  int64_t batch, numel;
};

cudaError_t launch_scaled_residual(const ScaledResidualArgs& args, cudaStream_t stream);

// sCM. inputs = (F, F_minus, dxt_dt, jvp, x_t), each (batch, numel); per sample the tangent
// g = coef[b] . (F_minus, dxt_dt, jvp, x_t) and d = F - F_minus.
// sums[b] = (sum g^2, sum d g, sum d^2).
struct ScmLossSumsArgs {
  DType dtype;
  const void* inputs[5];
  const float* t;  // (batch,): the tangent's coefficients are scm_coefficients(t[b], ...)
  float sigma_data, warmup;
  SampleReduceArgs reduce;
};

cudaError_t launch_scm_loss_sums(const ScmLossSumsArgs& args, cudaStream_t stream);

// out = scale(b) * (d - coef[b] . (F_minus, dxt_dt, jvp, x_t)).
struct ScmLossBackwardArgs {
  DType dtype;
  const void* inputs[5];
  const float* coef;   // (batch, 4), rows coef_stride floats apart
  int64_t coef_stride;
  SampleScale scale;
  void* out;           // (batch, numel), written
  int64_t batch, numel;
};

cudaError_t launch_scm_loss_backward(const ScmLossBackwardArgs& args, cudaStream_t stream);

// GAN logits, z = -x if negative else x: sums[b] = sum softplus(z) over sample b.
struct SoftplusSumsArgs {
  DType dtype;
  const void* x;  // (batch, numel)
  bool negative;
  SampleReduceArgs reduce;
};

cudaError_t launch_softplus_sums(const SoftplusSumsArgs& args, cudaStream_t stream);

// out = scale(b) * dsoftplus(z)/dx = scale(b) * (negative ? -1 : 1) * sigmoid(z).
struct SoftplusBackwardArgs {
  DType dtype;
  const void* x;       // (batch, numel)
  bool negative;
  SampleScale scale;
  void* out;           // (batch, numel), written
  int64_t batch, numel;
};

cudaError_t launch_softplus_backward(const SoftplusBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgen
