// The one place that declares the extension's op schemas and binds their implementations.
//
// Ops live in the namespace fastgen_C; they are the C++ backends ("cpu" and "cuda") behind the
// public custom ops fastgen::* defined in Python (fastgen_kernels/ops), which validate arguments
// with readable errors, pick a backend and carry autograd. Each op here has one implementation for
// both dispatch keys: it checks its inputs, allocates every output, then runs the CPU kernel
// (csrc/cpu) or launches the CUDA kernel (csrc/cuda, compiled when FASTGEN_WITH_CUDA is defined).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "ops.h"

#ifdef FASTGEN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace fastgen {
namespace {

using at::Tensor;
using std::optional;

void check_activation(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (B, L, D), got ", x.sizes());
  // the row kernels size their work by B and D (an integer division by zero); the Python ops
  // give empty inputs to the reference
  TORCH_CHECK(x.numel() > 0, name, " must not be empty, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// A modulation tensor: (B, D) or (B, L, D), like x.
void check_modulation(const Tensor& mod, const Tensor& x, const char* name) {
  const bool ok = (mod.dim() == 2 && mod.size(0) == x.size(0) && mod.size(1) == x.size(2)) ||
                  (mod.dim() == 3 && mod.sizes() == x.sizes());
  TORCH_CHECK(ok, name, " must be (B, D) or (B, L, D) with x ", x.sizes(), ", got ", mod.sizes());
  TORCH_CHECK(mod.is_contiguous() && mod.scalar_type() == x.scalar_type() && mod.device() == x.device(),
              name, " must be contiguous with x's dtype and device");
}

const Tensor* check_param(const optional<Tensor>& p, const Tensor& x, const char* name) {
  if (!p) return nullptr;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), name, " must be (D,), got ", p->sizes());
  TORCH_CHECK(p->is_contiguous() && p->scalar_type() == x.scalar_type() && p->device() == x.device(),
              name, " must be contiguous with x's dtype and device");
  return &*p;
}

at::ScalarType stat_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// mean and rstd as the norm's forward wrote them for x (mean unread for RMSNorm).
void check_norm_statistics(const Tensor& mean, const Tensor& rstd, const Tensor& x, bool rms) {
  TORCH_CHECK(rstd.numel() == x.size(0) * x.size(1) && rstd.scalar_type() == stat_dtype(x) &&
                  rstd.is_contiguous() && rstd.device() == x.device() && (rms || mean.sizes() == rstd.sizes()),
              "mean and rstd must be the forward's statistics");
  TORCH_CHECK(rms || (mean.scalar_type() == rstd.scalar_type() && mean.is_contiguous() &&
                      mean.device() == x.device()),
              "mean must be the forward's statistics");
}

// Whether kernels over `wide` tensors also read or write a `narrow` one beside them (the pairs
// the mixed-dtype kernels are built for): the same dtype, or float16/bfloat16 beside float32
// (autocast's activations beside an fp32 residual stream).
bool kernel_dtype_pair(at::ScalarType wide, at::ScalarType narrow) {
  return narrow == wide || (wide == at::kFloat && (narrow == at::kHalf || narrow == at::kBFloat16));
}

// The backward kernels' row chunks for tensors on x's device. On a GPU about eight per SM: a
// block walks its chunk's rows one after another, so the rows in flight are the blocks resident
// at once, and the default 256 chunks left about two per SM of an H100/H200, too few to cover the
// memory's latency (occupancy arithmetic, to be measured). On the CPU row_chunks' default.
RowChunks device_row_chunks(const Tensor& x, int64_t batch, int64_t tokens) {
#ifdef FASTGEN_WITH_CUDA
  int sms = 0;
  if (x.is_cuda() && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()) == cudaSuccess) {
    return row_chunks(batch, tokens, 8 * int64_t{sms});
  }
#endif
  return row_chunks(batch, tokens);
}

// Sums a (num_chunks, D) slot of partial sums over the chunks of each batch -> (B, D), or over
// all chunks -> (D,).
Tensor reduce_chunks(const Tensor& slot, int64_t batch, RowChunks chunks, bool per_batch,
                     at::ScalarType dtype) {
  const Tensor sums = per_batch ? slot.view({batch, chunks.chunks_per_batch, slot.size(-1)}).sum(1)
                                : slot.sum(0);
  return sums.to(dtype);
}

#ifdef FASTGEN_WITH_CUDA
cuda::DType cuda_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "CUDA kernels take float16, bfloat16 or float32, got ", x.scalar_type());
  }
}

const void* data_or_null(const Tensor* t) { return t ? t->const_data_ptr() : nullptr; }

const float* float_data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, kernel, " failed: ", cudaGetErrorString(error));
}
#endif

// out_dtype: y's, x's by default; float16 or bfloat16 with float32 x (the dtype of the linear layer
// that reads y under autocast: no cast after the norm).
std::tuple<Tensor, Tensor, Tensor> modulated_norm_forward(
    const Tensor& x, const Tensor& shift, const Tensor& scale, const optional<Tensor>& weight,
    const optional<Tensor>& bias, double eps, bool rms, optional<at::ScalarType> out_dtype) {
  check_activation(x, "x");
  check_modulation(shift, x, "shift");
  check_modulation(scale, x, "scale");
  const Tensor* w = check_param(weight, x, "weight");
  const Tensor* b = check_param(bias, x, "bias");
  TORCH_CHECK(!(rms && b), "RMSNorm takes no bias");
  const at::ScalarType y_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(kernel_dtype_pair(x.scalar_type(), y_dtype),
              "out_dtype must be x's dtype, or float16/bfloat16 with float32 x; got ", y_dtype, " with ",
              x.scalar_type());
  Tensor out = at::empty_like(x, x.options().dtype(y_dtype));
  const auto stats = x.options().dtype(stat_dtype(x));
  Tensor mean = rms ? at::empty({0}, stats) : at::empty({x.size(0), x.size(1)}, stats);
  Tensor rstd = at::empty({x.size(0), x.size(1)}, stats);
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::ModulatedNormForwardArgs args{cuda_dtype(x), cuda_dtype(out), x.const_data_ptr(), shift.const_data_ptr(),
        scale.const_data_ptr(), data_or_null(w), data_or_null(b), out.mutable_data_ptr(),
        rms ? nullptr : mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), x.size(0) * x.size(1),
        x.size(1), x.size(2), shift.dim() == 3, scale.dim() == 3, rms, static_cast<float>(eps)};
    check_launch(cuda::launch_modulated_norm_forward(args, c10::cuda::getCurrentCUDAStream()),
                 "modulated_norm_forward");
#endif
  } else {
    cpu::modulated_norm_forward(x, shift, scale, w, b, eps, rms, out, mean, rstd);
  }
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> modulated_norm_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& shift, const Tensor& scale,
    const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mean,
    const Tensor& rstd, bool rms) {
  check_activation(x, "x");
  check_activation(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && kernel_dtype_pair(x.scalar_type(), grad_out.scalar_type()),
              "grad_out must have x's shape and dtype (or float16/bfloat16 with float32 x)");
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out must be on x's device");
  check_modulation(shift, x, "shift");
  check_modulation(scale, x, "scale");
  const Tensor* w = check_param(weight, x, "weight");
  const Tensor* b = check_param(bias, x, "bias");
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  check_norm_statistics(mean, rstd, x, rms);
  const bool shift_per_token = shift.dim() == 3, scale_per_token = scale.dim() == 3;
  const RowChunks chunks = device_row_chunks(x, batch, tokens);
  const int64_t num_chunks = batch * chunks.chunks_per_batch;
  Tensor dx = at::empty_like(x);
  // Per-token modulation gradients are written by the kernel; per-batch ones come from partials.
  Tensor dshift_full = shift_per_token ? at::empty_like(x) : Tensor();
  Tensor dscale_full = scale_per_token ? at::empty_like(x) : Tensor();
  Tensor partials = at::empty({4, num_chunks, dim}, x.options().dtype(stat_dtype(x)));
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::ModulatedNormBackwardArgs args{cuda_dtype(x), cuda_dtype(grad_out), grad_out.const_data_ptr(),
        x.const_data_ptr(),
        scale.const_data_ptr(), data_or_null(w), data_or_null(b),
        rms ? nullptr : mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
        dx.mutable_data_ptr(), shift_per_token ? dshift_full.mutable_data_ptr() : nullptr,
        scale_per_token ? dscale_full.mutable_data_ptr() : nullptr,
        partials.mutable_data_ptr<float>(), batch * tokens, tokens, dim, chunks.rows_per_chunk,
        chunks.chunks_per_batch, shift_per_token, scale_per_token, rms};
    check_launch(cuda::launch_modulated_norm_backward(args, c10::cuda::getCurrentCUDAStream()),
                 "modulated_norm_backward");
#endif
  } else {
    cpu::modulated_norm_backward(grad_out, x, shift_per_token, scale, w, b, mean, rstd, rms, chunks,
                                 dx, dshift_full, dscale_full, partials);
  }
  const auto dtype = x.scalar_type();
  Tensor dshift = shift_per_token ? dshift_full : reduce_chunks(partials[kSlotShift], batch, chunks, true, dtype);
  Tensor dscale = scale_per_token ? dscale_full : reduce_chunks(partials[kSlotScale], batch, chunks, true, dtype);
  Tensor dweight = w ? reduce_chunks(partials[kSlotWeight], batch, chunks, false, dtype) : at::empty({0}, x.options());
  Tensor dbias = b ? reduce_chunks(partials[kSlotBias], batch, chunks, false, dtype) : at::empty({0}, x.options());
  return {dx, dshift, dscale, dweight, dbias};
}

// The tangent of the norm's output, the forward-mode rule's: each tangent optional, shaped and
// typed as its primal (tshift and tscale per token or per batch on their own); ty in out_dtype
// (x's by default, or float16/bfloat16 with float32 x, as the forward's).
Tensor modulated_norm_jvp(const Tensor& x, const Tensor& scale, const optional<Tensor>& weight,
                          const optional<Tensor>& bias, const Tensor& mean, const Tensor& rstd, bool rms,
                          const optional<Tensor>& tx, const optional<Tensor>& tshift,
                          const optional<Tensor>& tscale, const optional<Tensor>& tweight,
                          const optional<Tensor>& tbias, optional<at::ScalarType> out_dtype) {
  check_activation(x, "x");
  check_modulation(scale, x, "scale");
  const Tensor* w = check_param(weight, x, "weight");
  const Tensor* b = check_param(bias, x, "bias");
  TORCH_CHECK(!(rms && b), "RMSNorm takes no bias");
  check_norm_statistics(mean, rstd, x, rms);
  if (tx) {
    TORCH_CHECK(tx->sizes() == x.sizes() && tx->is_contiguous() && tx->scalar_type() == x.scalar_type() &&
                    tx->device() == x.device(),
                "tx must be contiguous with x's shape, dtype and device");
  }
  if (tshift) check_modulation(*tshift, x, "tshift");
  if (tscale) check_modulation(*tscale, x, "tscale");
  const Tensor* tw = check_param(tweight, x, "tweight");
  const Tensor* tb = check_param(tbias, x, "tbias");
  TORCH_CHECK(!tw || w, "tweight needs a weight");
  TORCH_CHECK(!tb || b, "tbias needs a bias");
  const at::ScalarType ty_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(kernel_dtype_pair(x.scalar_type(), ty_dtype),
              "out_dtype must be x's dtype, or float16/bfloat16 with float32 x; got ", ty_dtype, " with ",
              x.scalar_type());
  Tensor ty = at::empty_like(x, x.options().dtype(ty_dtype));
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const auto per_token = [](const optional<Tensor>& t) { return t && t->dim() == 3; };
    cuda::ModulatedNormJvpArgs args{cuda_dtype(x), cuda_dtype(ty), x.const_data_ptr(), scale.const_data_ptr(),
        data_or_null(w), data_or_null(b), rms ? nullptr : mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
        tx ? tx->const_data_ptr() : nullptr, tshift ? tshift->const_data_ptr() : nullptr,
        tscale ? tscale->const_data_ptr() : nullptr, data_or_null(tw), data_or_null(tb), ty.mutable_data_ptr(),
        x.size(0) * x.size(1), x.size(1), x.size(2), scale.dim() == 3, per_token(tshift), per_token(tscale), rms};
    check_launch(cuda::launch_modulated_norm_jvp(args, c10::cuda::getCurrentCUDAStream()), "modulated_norm_jvp");
#endif
  } else {
    cpu::modulated_norm_jvp(x, scale, w, b, mean, rstd, rms, tx ? &*tx : nullptr, tshift ? &*tshift : nullptr,
                            tscale ? &*tscale : nullptr, tw, tb, ty);
  }
  return ty;
}

// The dtype the gated residual's kernels read its operands (y, gate, ...) in, next to x (or the
// upstream gradient) of dtype `dtype`: the operands' own when they share one that the kernels take
// with it (`dtype`, or float16/bfloat16 with float32: autocast's outputs on an fp32 residual
// stream, read without widened copies); nullopt when they do not.
optional<at::ScalarType> gated_operand_dtype(at::ScalarType dtype, std::initializer_list<const Tensor*> operands) {
  const at::ScalarType first = (*operands.begin())->scalar_type();
  for (const Tensor* t : operands) {
    if (t->scalar_type() != first) return std::nullopt;
  }
  return kernel_dtype_pair(dtype, first) ? optional<at::ScalarType>(first) : std::nullopt;
}

// Where the kernels take no pair of these dtypes (e.g. fp16 x with bf16 y): everything widened to
// one dtype, the arithmetic's (fp32, fp64 for fp64 inputs), so each input is read at its own
// precision and the result rounded once, as the Triton and reference backends do.
at::ScalarType gated_wide_dtype(std::initializer_list<const Tensor*> tensors) {
  at::ScalarType wide = at::kFloat;
  for (const Tensor* t : tensors) wide = at::promote_types(wide, t->scalar_type());
  return wide;
}

// An operand of the gated residual: like x in shape and device (a gate: (B, D) or (B, L, D)),
// contiguous in `dtype`.
Tensor gated_operand(const Tensor& t, const Tensor& x, at::ScalarType dtype, bool is_gate, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device");
  if (is_gate) {
    const bool ok = (t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2)) ||
                    (t.dim() == 3 && t.sizes() == x.sizes());
    TORCH_CHECK(ok, name, " must be (B, D) or (B, L, D) with x ", x.sizes(), ", got ", t.sizes());
  } else {
    TORCH_CHECK(t.sizes() == x.sizes(), name, " must match x ", x.sizes(), ", got ", t.sizes());
  }
  return t.to(dtype).contiguous();
}

Tensor gated_residual_forward(const Tensor& x, const Tensor& y, const Tensor& gate, const optional<Tensor>& y2,
                              const optional<Tensor>& gate2) {
  check_activation(x, "x");
  TORCH_CHECK(y2.has_value() == gate2.has_value(), "y2 and gate2 come together");
  const auto paired = y2 ? gated_operand_dtype(x.scalar_type(), {&y, &gate, &*y2, &*gate2})
                         : gated_operand_dtype(x.scalar_type(), {&y, &gate});
  if (!paired) {
    const auto wide = y2 ? gated_wide_dtype({&x, &y, &gate, &*y2, &*gate2}) : gated_wide_dtype({&x, &y, &gate});
    const auto widened = [&](const optional<Tensor>& t) { return t ? optional<Tensor>(t->to(wide)) : std::nullopt; };
    return gated_residual_forward(x.to(wide).contiguous(), y.to(wide), gate.to(wide), widened(y2), widened(gate2))
        .to(x.scalar_type());
  }
  const at::ScalarType dtype = *paired;
  const Tensor y_in = gated_operand(y, x, dtype, false, "y"), gate_in = gated_operand(gate, x, dtype, true, "gate");
  const Tensor y2_in = y2 ? gated_operand(*y2, x, dtype, false, "y2") : Tensor();
  const Tensor gate2_in = gate2 ? gated_operand(*gate2, x, dtype, true, "gate2") : Tensor();
  Tensor out = at::empty_like(x);
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::GatedResidualForwardArgs args{cuda_dtype(x), cuda_dtype(y_in), x.const_data_ptr(), y_in.const_data_ptr(),
        gate_in.const_data_ptr(), y2 ? y2_in.const_data_ptr() : nullptr, y2 ? gate2_in.const_data_ptr() : nullptr,
        out.mutable_data_ptr(), x.size(0) * x.size(1), x.size(1), x.size(2), gate_in.dim() == 3,
        y2 && gate2_in.dim() == 3};
    check_launch(cuda::launch_gated_residual_forward(args, c10::cuda::getCurrentCUDAStream()),
                 "gated_residual_forward");
#endif
  } else {
    cpu::gated_residual_forward(x, y_in, gate_in, y2 ? &y2_in : nullptr, y2 ? &gate2_in : nullptr, out);
  }
  return out;
}

// (dy, dgate) in y's and gate's dtypes.
std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad_out, const Tensor& y,
                                                   const Tensor& gate) {
  check_activation(grad_out, "grad_out");
  const auto paired = gated_operand_dtype(grad_out.scalar_type(), {&y, &gate});
  if (!paired) {
    const auto wide = gated_wide_dtype({&grad_out, &y, &gate});
    auto [dy, dgate] = gated_residual_backward(grad_out.to(wide).contiguous(), y.to(wide), gate.to(wide));
    return {dy.to(y.scalar_type()), dgate.to(gate.scalar_type())};
  }
  const at::ScalarType dtype = *paired;
  const Tensor y_in = gated_operand(y, grad_out, dtype, false, "y");
  const Tensor gate_in = gated_operand(gate, grad_out, dtype, true, "gate");
  const int64_t batch = y.size(0), tokens = y.size(1), dim = y.size(2);
  const bool per_token = gate.dim() == 3;
  const RowChunks chunks = device_row_chunks(y, batch, tokens);
  Tensor dy = at::empty_like(y_in);
  Tensor dgate_full = per_token ? at::empty_like(y_in) : Tensor();
  Tensor partials = per_token ? Tensor()
                              : at::empty({1, batch * chunks.chunks_per_batch, dim},
                                          y.options().dtype(stat_dtype(grad_out)));
  if (y.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    cuda::GatedResidualBackwardArgs args{cuda_dtype(grad_out), cuda_dtype(y_in), grad_out.const_data_ptr(),
        y_in.const_data_ptr(), gate_in.const_data_ptr(), dy.mutable_data_ptr(),
        per_token ? dgate_full.mutable_data_ptr() : nullptr,
        per_token ? nullptr : partials.mutable_data_ptr<float>(), batch * tokens, tokens, dim,
        chunks.rows_per_chunk, chunks.chunks_per_batch, per_token};
    check_launch(cuda::launch_gated_residual_backward(args, c10::cuda::getCurrentCUDAStream()),
                 "gated_residual_backward");
#endif
  } else {
    cpu::gated_residual_backward(grad_out, y_in, gate_in, chunks, dy, dgate_full, partials);
  }
  Tensor dgate = per_token ? dgate_full : reduce_chunks(partials[0], batch, chunks, true, dtype);
  return {dy.to(y.scalar_type()), dgate.to(gate.scalar_type())};
}

// The gated residual with its autograd in C++: what fastgen_kernels/ops/gated_residual.py's
// autograd.Function does where a backward will follow (no forward-mode AD), without Python around
// its two kernels (a DiT block has two). The kernels read y and gate as given (see
// gated_operand_dtype for the pairs of dtypes they take, gated_wide_dtype for the others); the
// backward returns each gradient in its input's dtype.
class GatedResidual : public torch::autograd::Function<GatedResidual> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& y,
                        const Tensor& gate) {
    ctx->save_for_backward({y, gate});
    ctx->set_materialize_grads(false);
    return gated_residual_forward(x.contiguous(), y, gate, std::nullopt, std::nullopt);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Tensor& grad = grads[0];
    if (!grad.defined()) return {Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const Tensor &y = saved[0], &gate = saved[1];
    Tensor dy, dgate;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops, as the Python backward
      const Tensor gate_rows = (gate.dim() == 2 ? gate.unsqueeze(1) : gate).to(grad.scalar_type());
      dy = (grad * gate_rows).to(y.scalar_type());
      dgate = grad * y.to(grad.scalar_type());
      dgate = (gate.dim() == 2 ? dgate.sum(1) : dgate).to(gate.scalar_type());
    } else if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      std::tie(dy, dgate) = gated_residual_backward(grad.contiguous(), y, gate);
    }
    return {ctx->needs_input_grad(0) ? grad : Tensor(), ctx->needs_input_grad(1) ? dy : Tensor(),
            ctx->needs_input_grad(2) ? dgate : Tensor()};
  }
};

Tensor gated_residual(const Tensor& x, const Tensor& y, const Tensor& gate) {
  return GatedResidual::apply(x, y, gate);
}

// F.linear(modulated_norm(x, ...), weight, bias) with its autograd in C++: what
// fastgen_kernels/ops/modulated_norm.py's _ModulatedNormLinearFunction does (a DiT block's qkv
// and fc1 where a backward follows), without Python around its kernels. It keeps x and the
// statistics, not the norm's output: the weight gradient recomputes it. The norm writes its output
// in norm_out_dtype (x's by default; the Python caller passes the layer's autocast dtype where the
// kernels can write it, so no cast follows), the linear layer runs in the dtype autocast gives it
// (the upstream gradient's in the backward).
class ModulatedNormLinear : public torch::autograd::Function<ModulatedNormLinear> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& shift,
                        const Tensor& scale, const optional<Tensor>& norm_weight, const optional<Tensor>& norm_bias,
                        double eps, bool rms, const Tensor& weight, const optional<Tensor>& bias,
                        optional<at::ScalarType> norm_out_dtype) {
    const optional<Tensor> w = norm_weight ? optional<Tensor>(norm_weight->contiguous()) : std::nullopt;
    const optional<Tensor> b = norm_bias ? optional<Tensor>(norm_bias->contiguous()) : std::nullopt;
    auto [y, mean, rstd] = modulated_norm_forward(x.contiguous(), shift.contiguous(), scale.contiguous(), w, b, eps,
                                                  rms, norm_out_dtype);
    // the norm's weight and bias as given: a create_graph=True backward differentiates with respect
    // to them, and a contiguous copy would be a tensor off the graph
    ctx->save_for_backward({x, shift, scale, norm_weight.value_or(Tensor()), norm_bias.value_or(Tensor()), mean,
                            rstd, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y.scalar_type());
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["bias_dtype"] = bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    ctx->set_materialize_grads(false);
    return at::linear(y, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(10);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &shift = saved[1], &scale = saved[2], &mean = saved[5], &rstd = saved[6],
                 &weight = saved[7];
    // the norm's weight and bias as given (create_graph differentiates them), contiguous for the kernels
    const optional<Tensor> given_w = saved[3].defined() ? optional<Tensor>(saved[3]) : std::nullopt;
    const optional<Tensor> given_b = saved[4].defined() ? optional<Tensor>(saved[4]) : std::nullopt;
    const optional<Tensor> w = given_w ? optional<Tensor>(given_w->contiguous()) : std::nullopt;
    const optional<Tensor> b = given_b ? optional<Tensor>(given_b->contiguous()) : std::nullopt;
    const bool rms = ctx->saved_data["rms"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    // needs_input_grad counts the tensor inputs given (absent optionals have no edge)
    const int64_t weight_edge = 3 + w.has_value() + b.has_value();
    if (bias_dtype >= 0 && ctx->needs_input_grad(weight_edge + 1)) {
      out[8] = grad.reshape({-1, grad.size(-1)}).sum(0).to(static_cast<at::ScalarType>(bias_dtype));
    }
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients that differentiate again
      composition_gradients(ctx, grad, x, shift, scale, given_w, given_b, weight, rms, weight_edge, out);
      return out;
    }
    bool needs_norm = false;
    for (int64_t edge = 0; edge < weight_edge; ++edge) needs_norm = needs_norm || ctx->needs_input_grad(edge);
    const Tensor rows = grad.reshape({-1, grad.size(-1)});
    if (ctx->needs_input_grad(weight_edge)) {
      const auto y_dtype = static_cast<at::ScalarType>(ctx->saved_data["y_dtype"].toInt());
      const Tensor y = std::get<0>(modulated_norm_forward(x.contiguous(), shift.contiguous(), scale.contiguous(), w, b,
                                                          ctx->saved_data["eps"].toDouble(), rms, y_dtype));
      out[7] = rows.t().matmul(y.reshape({-1, y.size(-1)}).to(rows.scalar_type())).to(weight.scalar_type());
    }
    if (needs_norm) {
      // the layer's input gradient as it comes (bf16 under autocast): the norm's kernels read it
      Tensor dy = grad.matmul(weight.to(grad.scalar_type()));
      if (!kernel_dtype_pair(x.scalar_type(), dy.scalar_type())) dy = dy.to(x.scalar_type());
      auto [dx, dshift, dscale, dweight, dbias] = modulated_norm_backward(
          dy.contiguous(), x.contiguous(), shift.contiguous(), scale.contiguous(), w, b, mean, rstd, rms);
      const Tensor norm_grads[] = {dx, dshift, dscale, dweight, dbias};
      const bool present[] = {true, true, true, w.has_value(), b.has_value()};
      for (int64_t i = 0, edge = 0; i < 5; ++i) {
        if (!present[i]) continue;
        if (ctx->needs_input_grad(edge++)) out[i] = norm_grads[i];
      }
    }
    return out;
  }

 private:
  // The gradients of the composition as autograd of ATen's layer / RMS norm (the Python op's
  // reference, fp32), for a create_graph=True backward (a gradient penalty through a DiT): the
  // kernels' outputs would differentiate as constants. out[i] for the argument positions 0-4, 7.
  static void composition_gradients(torch::autograd::AutogradContext* ctx, const Tensor& grad, const Tensor& x,
                                    const Tensor& shift, const Tensor& scale, const optional<Tensor>& w,
                                    const optional<Tensor>& b, const Tensor& weight, bool rms, int64_t weight_edge,
                                    torch::autograd::variable_list& out) {
    const auto ct = at::promote_types(x.scalar_type(), at::kFloat);
    const int64_t dim = x.size(-1);
    const optional<Tensor> wf = w ? optional<Tensor>(w->to(ct)) : std::nullopt;
    const optional<Tensor> bf = b ? optional<Tensor>(b->to(ct)) : std::nullopt;
    // the affine part written out, as the reference does: ATen's layer_norm with a bias and no
    // weight has a double backward that drops the bias gradient's dependence on its upstream
    // gradient, and rms_norm takes no bias
    const double eps = ctx->saved_data["eps"].toDouble();
    Tensor n = rms ? at::rms_norm(x.to(ct), {dim}, std::nullopt, eps)
                   : at::layer_norm(x.to(ct), {dim}, std::nullopt, std::nullopt, eps);
    if (wf) n = n * *wf;
    if (bf) n = n + *bf;
    const auto rows = [&](const Tensor& m) { return (m.dim() == 2 ? m.unsqueeze(1) : m).to(ct); };
    const Tensor y = (n * (1 + rows(scale)) + rows(shift)).to(x.scalar_type());
    const Tensor result = at::linear(y.to(grad.scalar_type()), weight.to(grad.scalar_type()));
    const Tensor inputs[] = {x, shift, scale, w.value_or(Tensor()), b.value_or(Tensor()), weight};
    const int64_t slots[] = {0, 1, 2, 3, 4, 7};
    std::vector<Tensor> wanted;
    std::vector<int64_t> wanted_slots;
    for (int64_t i = 0, edge = 0; i < 6; ++i) {
      if (!inputs[i].defined()) continue;
      const int64_t this_edge = i == 5 ? weight_edge : edge++;
      if (ctx->needs_input_grad(this_edge)) {
        wanted.push_back(inputs[i]);
        wanted_slots.push_back(slots[i]);
      }
    }
    if (wanted.empty()) return;
    const auto gradients = torch::autograd::grad({result}, wanted, {grad}, /*retain_graph=*/true,
                                                 /*create_graph=*/true);
    for (size_t i = 0; i < wanted.size(); ++i) out[wanted_slots[i]] = gradients[i];
  }
};

Tensor modulated_norm_linear(const Tensor& x, const Tensor& shift, const Tensor& scale,
                             const optional<Tensor>& norm_weight, const optional<Tensor>& norm_bias, double eps,
                             bool rms, const Tensor& weight, const optional<Tensor>& bias,
                             optional<at::ScalarType> norm_out_dtype) {
  return ModulatedNormLinear::apply(x, shift, scale, norm_weight, norm_bias, eps, rms, weight, bias, norm_out_dtype);
}

// x: (B, L, H, Dh) heads whose vectors are contiguous; the B, L, H strides are free.
void check_heads(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be (B, L, H, Dh), got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1 || x.size(3) == 1, name, "'s head vectors must be contiguous");
}

// Checks q and k; returns the rotary tables in the kernels' dtype (fp32, fp64 for fp64 input),
// contiguous, or undefined tensors without rotary.
std::tuple<Tensor, Tensor> check_qk(const Tensor& q, const Tensor& k, const optional<Tensor>& cos,
                                    const optional<Tensor>& sin) {
  check_heads(q, "q");
  check_heads(k, "k");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) &&
                  k.scalar_type() == q.scalar_type() && k.device() == q.device(),
              "k must be (B, Lk, H, Dh) with q's B, H, Dh, dtype and device; q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin: pass both or neither");
  if (!cos) return {Tensor(), Tensor()};
  TORCH_CHECK(q.size(1) == k.size(1) && q.size(3) % 2 == 0,
              "rotary needs Lq == Lk and an even Dh; q ", q.sizes(), ", k ", k.sizes());
  auto table = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(1) && t.size(1) == q.size(3) &&
                    t.device() == q.device() && at::isFloatingType(t.scalar_type()),
                name, " must be a floating (L, Dh) tensor on q's device, got ", t.sizes());
    return t.to(stat_dtype(q)).contiguous();
  };
  return {table(*cos, "cos"), table(*sin, "sin")};
}

// rstd as norm_rope_forward wrote it for the heads x: one per head vector.
void check_head_statistics(const Tensor& rstd, const Tensor& x) {
  TORCH_CHECK(rstd.numel() == x.size(0) * x.size(1) * x.size(2) && rstd.scalar_type() == stat_dtype(x) &&
                  rstd.is_contiguous() && rstd.device() == x.device(),
              "rstd must be the forward's statistics");
}

const Tensor* defined_or_null(const Tensor& t) { return t.defined() ? &t : nullptr; }

// RMSNorm + rotary of one of q, k -> (out, rstd).
std::tuple<Tensor, Tensor> norm_rope_forward(const Tensor& x, const optional<Tensor>& weight,
                                             const Tensor& cos, const Tensor& sin, double eps,
                                             bool interleaved) {
  const Tensor* w = check_param(weight, x, "weight");
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor rstd = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(stat_dtype(x)));
  if (x.numel() == 0) return {out, rstd.fill_(NAN)};  // the rms of an empty head is NaN
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::QkNormRopeForwardArgs args{cuda_dtype(x), x.const_data_ptr(), data_or_null(w),
        float_data_or_null(cos), float_data_or_null(sin), out.mutable_data_ptr(),
        rstd.mutable_data_ptr<float>(), rstd.numel(), x.size(1), x.size(2), x.size(3), x.stride(0),
        x.stride(1), x.stride(2), interleaved, static_cast<float>(eps)};
    check_launch(cuda::launch_qk_norm_rope_forward(args, c10::cuda::getCurrentCUDAStream()),
                 "qk_norm_rope_forward");
#endif
  } else {
    cpu::qk_norm_rope_forward(x, w, defined_or_null(cos), defined_or_null(sin), eps, interleaved,
                              out, rstd);
  }
  return {out, rstd};
}

// The VJP of norm_rope_forward -> (dx, dweight); dweight is empty without a weight.
std::tuple<Tensor, Tensor> norm_rope_backward(const Tensor& grad_out, const Tensor& x,
                                              const optional<Tensor>& weight, const Tensor& cos,
                                              const Tensor& sin, const Tensor& rstd,
                                              bool interleaved) {
  const Tensor* w = check_param(weight, x, "weight");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device() == x.device() && grad_out.is_contiguous(),
              "grad_out must be contiguous and match x");
  const int64_t rows = x.size(0) * x.size(1) * x.size(2), dim = x.size(3);
  check_head_statistics(rstd, x);
  const RowChunks chunks = device_row_chunks(x, 1, rows);
  Tensor dx = at::empty(x.sizes(), x.options());
  if (rows == 0 || dim == 0) {
    return {dx, w ? at::zeros({dim}, x.options()) : at::empty({0}, x.options())};
  }
  Tensor partials = w ? at::empty({chunks.chunks_per_batch, dim}, x.options().dtype(stat_dtype(x)))
                      : Tensor();
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::QkNormRopeBackwardArgs args{cuda_dtype(x), grad_out.const_data_ptr(), x.const_data_ptr(),
        data_or_null(w), float_data_or_null(cos), float_data_or_null(sin),
        rstd.const_data_ptr<float>(), dx.mutable_data_ptr(),
        w ? partials.mutable_data_ptr<float>() : nullptr, rows, x.size(1), x.size(2), dim,
        x.stride(0), x.stride(1), x.stride(2), chunks.rows_per_chunk, chunks.chunks_per_batch,
        interleaved};
    check_launch(cuda::launch_qk_norm_rope_backward(args, c10::cuda::getCurrentCUDAStream()),
                 "qk_norm_rope_backward");
#endif
  } else {
    cpu::qk_norm_rope_backward(grad_out, x, w, defined_or_null(cos), defined_or_null(sin), rstd,
                               interleaved, chunks, dx, partials);
  }
  Tensor dweight = w ? reduce_chunks(partials, 1, chunks, false, x.scalar_type())
                     : at::empty({0}, x.options());
  return {dx, dweight};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_forward(
    const Tensor& q, const Tensor& k, const optional<Tensor>& q_weight,
    const optional<Tensor>& k_weight, const optional<Tensor>& cos, const optional<Tensor>& sin,
    double eps, bool interleaved) {
  const auto [cos_table, sin_table] = check_qk(q, k, cos, sin);
  auto [q_out, q_rstd] = norm_rope_forward(q, q_weight, cos_table, sin_table, eps, interleaved);
  auto [k_out, k_rstd] = norm_rope_forward(k, k_weight, cos_table, sin_table, eps, interleaved);
  return {q_out, k_out, q_rstd, k_rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_backward(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& q, const Tensor& k,
    const optional<Tensor>& q_weight, const optional<Tensor>& k_weight, const optional<Tensor>& cos,
    const optional<Tensor>& sin, const Tensor& q_rstd, const Tensor& k_rstd, bool interleaved) {
  const auto [cos_table, sin_table] = check_qk(q, k, cos, sin);
  auto [dq, dq_weight] = norm_rope_backward(grad_q, q, q_weight, cos_table, sin_table, q_rstd, interleaved);
  auto [dk, dk_weight] = norm_rope_backward(grad_k, k, k_weight, cos_table, sin_table, k_rstd, interleaved);
  return {dq, dk, dq_weight, dk_weight};
}

// The tangent of one of norm_rope_forward's outputs (the forward-mode rule's) given the tangents
// of x (x's shape, dtype and device, head vectors contiguous) and of the weight, each optional; a
// zero tangent without either.
Tensor norm_rope_jvp(const Tensor& x, const optional<Tensor>& weight, const Tensor& cos, const Tensor& sin,
                     const Tensor& rstd, bool interleaved, const optional<Tensor>& tx,
                     const optional<Tensor>& tweight, const char* tx_name, const char* tweight_name) {
  const Tensor* w = check_param(weight, x, "weight");
  check_head_statistics(rstd, x);
  if (tx) {
    check_heads(*tx, tx_name);
    TORCH_CHECK(tx->sizes() == x.sizes() && tx->scalar_type() == x.scalar_type() && tx->device() == x.device(),
                tx_name, " must have its primal's shape, dtype and device");
  }
  const Tensor* tw = check_param(tweight, x, tweight_name);
  TORCH_CHECK(!tw || w, tweight_name, " needs a weight");
  if (x.numel() == 0 || !(tx || tw)) return at::zeros(x.sizes(), x.options());
  Tensor out = at::empty(x.sizes(), x.options());
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::QkNormRopeJvpArgs args{cuda_dtype(x), x.const_data_ptr(), data_or_null(w), float_data_or_null(cos),
        float_data_or_null(sin), rstd.const_data_ptr<float>(), tx ? tx->const_data_ptr() : nullptr, data_or_null(tw),
        out.mutable_data_ptr(), rstd.numel(), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2),
        tx ? tx->stride(0) : 0, tx ? tx->stride(1) : 0, tx ? tx->stride(2) : 0, interleaved};
    check_launch(cuda::launch_qk_norm_rope_jvp(args, c10::cuda::getCurrentCUDAStream()), "qk_norm_rope_jvp");
#endif
  } else {
    cpu::qk_norm_rope_jvp(x, w, defined_or_null(cos), defined_or_null(sin), rstd, interleaved,
                          tx ? &*tx : nullptr, tw, out);
  }
  return out;
}

std::tuple<Tensor, Tensor> qk_norm_rope_jvp(
    const Tensor& q, const Tensor& k, const optional<Tensor>& q_weight, const optional<Tensor>& k_weight,
    const optional<Tensor>& cos, const optional<Tensor>& sin, const Tensor& q_rstd, const Tensor& k_rstd,
    bool interleaved, const optional<Tensor>& tq, const optional<Tensor>& tk, const optional<Tensor>& tq_weight,
    const optional<Tensor>& tk_weight) {
  const auto [cos_table, sin_table] = check_qk(q, k, cos, sin);
  return {norm_rope_jvp(q, q_weight, cos_table, sin_table, q_rstd, interleaved, tq, tq_weight, "tq", "tq_weight"),
          norm_rope_jvp(k, k_weight, cos_table, sin_table, k_rstd, interleaved, tk, tk_weight, "tk", "tk_weight")};
}

// Per-sample loss inputs: (B, ...) contiguous tensors of one shape, dtype and device.
void check_samples(const Tensor& x, std::initializer_list<std::pair<const Tensor*, const char*>> others) {
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, "loss inputs must be non-empty (B, ...) tensors, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "loss inputs must be contiguous");
  for (const auto& [t, name] : others) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device() && t->is_contiguous(),
                name, " must be contiguous with the first input's shape ", x.sizes(),
                ", dtype and device");
  }
}

// Runs `cpu_fn(sums)` or fills the CUDA reduce arguments for `cuda_fn(reduce)`; returns sums
// (B, nstat) in the statistics' dtype. With chunk_partials, on CUDA, returns the reduction's partial
// sums (B * chunks_per_sample, nstat) instead, which a loss's tail adds up itself
// (sample_loss_tail_impl); the CPU reduction always returns the sums.
template <typename CpuFn, typename CudaFn>
Tensor sample_sums(const Tensor& x, int64_t nstat, bool chunk_partials, CpuFn&& cpu_fn,
                   [[maybe_unused]] CudaFn&& cuda_fn) {
  const int64_t batch = x.size(0), numel = x.numel() / batch;
  const auto options = x.options().dtype(stat_dtype(x));
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const SampleChunks chunks = sample_chunks(batch, numel);
    Tensor partials = at::empty({batch * chunks.chunks_per_sample, nstat}, options);
    Tensor sums = chunk_partials ? Tensor() : at::empty({batch, nstat}, options);
    cuda::SampleReduceArgs reduce{batch, numel, chunks.chunk_size, chunks.chunks_per_sample,
                                  partials.mutable_data_ptr<float>(),
                                  chunk_partials ? nullptr : sums.mutable_data_ptr<float>()};
    cuda_fn(reduce);
    return chunk_partials ? partials : sums;
#endif
  }
  Tensor sums = at::empty({batch, nstat}, options);
  cpu_fn(sums);
  return sums;
}

Tensor vsd_loss_sums(const Tensor& x_g, const Tensor& teacher, const Tensor& fake, bool chunk_partials = false) {
  check_samples(x_g, {{&teacher, "x0_teacher"}, {&fake, "x0_fake"}});
  return sample_sums(
      x_g, 2, chunk_partials, [&](Tensor& sums) { cpu::vsd_loss_sums(x_g, teacher, fake, sums); },
      [&]([[maybe_unused]] const auto& reduce) {
#ifdef FASTGEN_WITH_CUDA
        cuda::VsdLossSumsArgs args{cuda_dtype(x_g), x_g.const_data_ptr(), teacher.const_data_ptr(),
                                   fake.const_data_ptr(), reduce};
        check_launch(cuda::launch_vsd_loss_sums(args, c10::cuda::getCurrentCUDAStream()), "vsd_loss_sums");
#endif
      });
}

// A per-sample scalar tensor: (B,) or (B, width) contiguous, of the statistics' dtype, on x's device.
void check_per_sample(const Tensor& p, const Tensor& x, int64_t width, const char* name) {
  const bool shape_ok = width == 1 ? (p.dim() == 1 && p.size(0) == x.size(0))
                                   : (p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == width);
  TORCH_CHECK(shape_ok && p.is_contiguous() && p.scalar_type() == stat_dtype(x) &&
                  p.device() == x.device(),
              name, " must be a contiguous (B", width == 1 ? "" : ", width", ") tensor of the statistics' dtype on the input's device, got ",
              p.sizes());
}

// c and k of the squared residual: both given or both absent.
const Tensor* check_residual_term(const Tensor& a, const optional<Tensor>& c, const optional<Tensor>& k) {
  TORCH_CHECK(c.has_value() == k.has_value(), "c and k must be given together");
  if (!c.has_value()) return nullptr;
  check_samples(a, {{&*c, "c"}});
  check_per_sample(*k, a, 1, "k");
  return &*c;
}

Tensor squared_residual_sums(const Tensor& a, const Tensor& b, const optional<Tensor>& c,
                             const optional<Tensor>& k, bool chunk_partials = false) {
  check_samples(a, {{&b, "b"}});
  const Tensor* term = check_residual_term(a, c, k);
  const Tensor none;
  return sample_sums(
      a, 1, chunk_partials,
      [&](Tensor& sums) { cpu::squared_residual_sums(a, b, term ? *c : none, term ? *k : none, sums); },
      [&]([[maybe_unused]] const auto& reduce) {
#ifdef FASTGEN_WITH_CUDA
        cuda::SquaredResidualSumsArgs args{cuda_dtype(a), a.const_data_ptr(), b.const_data_ptr(),
                                           term ? c->const_data_ptr() : nullptr,
                                           term ? k->const_data_ptr<float>() : nullptr, reduce};
        check_launch(cuda::launch_squared_residual_sums(args, c10::cuda::getCurrentCUDAStream()),
                     "squared_residual_sums");
#endif
      });
}

// The per-sample scale of a loss's backward pass: s_b = factor[b] * g_b, factor (B,) of the
// statistics' dtype at any stride (a column of the loss tail's saved factors), g the upstream
// gradient, () or (B,), or absent (g = 1). The CPU kernels read s as a contiguous (B,) tensor; the
// CUDA kernels read factor and g themselves (cuda::SampleScale), which saves the (B,) product's
// launch on a GPU.
struct BackwardScale {
  Tensor factor, grad;  // grad undefined: 1

  BackwardScale(const Tensor& factor_, const Tensor& x, const Tensor* grad_) : factor(factor_) {
    TORCH_CHECK(factor.dim() == 1 && factor.size(0) == x.size(0) && factor.scalar_type() == stat_dtype(x) &&
                    factor.device() == x.device(),
                "the backward's per-sample factor must be a (B,) tensor of the statistics' dtype on the input's "
                "device, got ", factor.sizes());
    if (grad_ != nullptr) {
      TORCH_CHECK(grad_->dim() == 0 || (grad_->dim() == 1 && grad_->size(0) == x.size(0)),
                  "the upstream gradient must be () or (B,), got ", grad_->sizes());
      grad = grad_->to(factor.scalar_type());
    }
  }

  Tensor cpu() const { return grad.defined() ? (factor * grad).contiguous() : factor.contiguous(); }

#ifdef FASTGEN_WITH_CUDA
  cuda::SampleScale cuda() const {
    return {factor.const_data_ptr<float>(), factor.stride(0), grad.defined() ? grad.const_data_ptr<float>() : nullptr,
            grad.defined() && grad.dim() == 1 ? grad.stride(0) : 0};
  }
#endif
};

std::tuple<Tensor, Tensor> scaled_residual_scaled_by(const Tensor& a, const Tensor& b, const optional<Tensor>& c,
                                                     const optional<Tensor>& k, const BackwardScale& scale,
                                                     bool negated) {
  check_samples(a, {{&b, "b"}});
  const Tensor* term = check_residual_term(a, c, k);
  Tensor out = at::empty_like(a);
  Tensor neg = negated ? at::empty_like(a) : Tensor();
  if (a.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(a.device());
    cuda::ScaledResidualArgs args{cuda_dtype(a), a.const_data_ptr(), b.const_data_ptr(),
        term ? c->const_data_ptr() : nullptr, term ? k->const_data_ptr<float>() : nullptr,
        scale.cuda(), out.mutable_data_ptr(), negated ? neg.mutable_data_ptr() : nullptr,
        a.size(0), a.numel() / a.size(0)};
    check_launch(cuda::launch_scaled_residual(args, c10::cuda::getCurrentCUDAStream()), "scaled_residual");
#endif
  } else {
    const Tensor none;
    cpu::scaled_residual(a, b, term ? *c : none, term ? *k : none, scale.cpu(), out, neg);
  }
  return {out, negated ? neg : at::empty({0}, a.options())};
}

std::tuple<Tensor, Tensor> scaled_residual(const Tensor& a, const Tensor& b, const optional<Tensor>& c,
                                           const optional<Tensor>& k, const Tensor& scale, bool negated) {
  check_per_sample(scale, a, 1, "scale");
  return scaled_residual_scaled_by(a, b, c, k, BackwardScale(scale, a, nullptr), negated);
}

// The five sCM inputs (F, F_minus, dxt_dt, jvp, x_t) and their (B, 4) coefficients.
void check_scm(const Tensor (&in)[5]) {
  check_samples(in[0], {{&in[1], "F_minus"}, {&in[2], "dxt_dt"}, {&in[3], "jvp"}, {&in[4], "x_t"}});
}

Tensor scm_loss_sums(const Tensor& F, const Tensor& F_minus, const Tensor& dxt_dt, const Tensor& jvp,
                     const Tensor& x_t, const Tensor& t, double sigma_data, double warmup,
                     bool chunk_partials = false) {
  const Tensor in[5] = {F, F_minus, dxt_dt, jvp, x_t};
  check_scm(in);
  check_per_sample(t, F, 1, "t");
  return sample_sums(
      F, 3, chunk_partials, [&](Tensor& sums) { cpu::scm_loss_sums(in, t, sigma_data, warmup, sums); },
      [&]([[maybe_unused]] const auto& reduce) {
#ifdef FASTGEN_WITH_CUDA
        cuda::ScmLossSumsArgs args{cuda_dtype(F), {F.const_data_ptr(), F_minus.const_data_ptr(),
            dxt_dt.const_data_ptr(), jvp.const_data_ptr(), x_t.const_data_ptr()},
            t.const_data_ptr<float>(), static_cast<float>(sigma_data), static_cast<float>(warmup), reduce};
        check_launch(cuda::launch_scm_loss_sums(args, c10::cuda::getCurrentCUDAStream()), "scm_loss_sums");
#endif
      });
}

// coef: (B, 4) of the statistics' dtype with contiguous rows at any row stride (a column block of
// the sCM tail's saved factors).
Tensor scm_loss_backward_scaled_by(const Tensor& F, const Tensor& F_minus, const Tensor& dxt_dt, const Tensor& jvp,
                                   const Tensor& x_t, const Tensor& coef, const BackwardScale& scale) {
  const Tensor in[5] = {F, F_minus, dxt_dt, jvp, x_t};
  check_scm(in);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == F.size(0) && coef.size(1) == 4 && coef.stride(1) == 1 &&
                  coef.stride(0) >= 4 && coef.scalar_type() == stat_dtype(F) && coef.device() == F.device(),
              "coef must be a (B, 4) tensor with contiguous rows, of the statistics' dtype on F's device, got ",
              coef.sizes(), " strides ", coef.strides());
  Tensor out = at::empty_like(F);
  if (F.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(F.device());
    cuda::ScmLossBackwardArgs args{cuda_dtype(F), {F.const_data_ptr(), F_minus.const_data_ptr(),
        dxt_dt.const_data_ptr(), jvp.const_data_ptr(), x_t.const_data_ptr()},
        coef.const_data_ptr<float>(), coef.stride(0), scale.cuda(), out.mutable_data_ptr(),
        F.size(0), F.numel() / F.size(0)};
    check_launch(cuda::launch_scm_loss_backward(args, c10::cuda::getCurrentCUDAStream()), "scm_loss_backward");
#endif
  } else {
    cpu::scm_loss_backward(in, coef, scale.cpu(), out);
  }
  return out;
}

Tensor scm_loss_backward(const Tensor& F, const Tensor& F_minus, const Tensor& dxt_dt,
                         const Tensor& jvp, const Tensor& x_t, const Tensor& coef, const Tensor& scale) {
  check_per_sample(scale, F, 1, "scale");
  return scm_loss_backward_scaled_by(F, F_minus, dxt_dt, jvp, x_t, coef, BackwardScale(scale, F, nullptr));
}

Tensor softplus_sums(const Tensor& x, bool negative, bool chunk_partials = false) {
  check_samples(x, {});
  return sample_sums(
      x, 1, chunk_partials, [&](Tensor& sums) { cpu::softplus_sums(x, negative, sums); },
      [&]([[maybe_unused]] const auto& reduce) {
#ifdef FASTGEN_WITH_CUDA
        cuda::SoftplusSumsArgs args{cuda_dtype(x), x.const_data_ptr(), negative, reduce};
        check_launch(cuda::launch_softplus_sums(args, c10::cuda::getCurrentCUDAStream()), "softplus_sums");
#endif
      });
}

Tensor softplus_backward_scaled_by(const Tensor& x, bool negative, const BackwardScale& scale) {
  check_samples(x, {});
  Tensor out = at::empty_like(x);
  if (x.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::SoftplusBackwardArgs args{cuda_dtype(x), x.const_data_ptr(), negative, scale.cuda(), out.mutable_data_ptr(),
                                    x.size(0), x.numel() / x.size(0)};
    check_launch(cuda::launch_softplus_backward(args, c10::cuda::getCurrentCUDAStream()), "softplus_backward");
#endif
  } else {
    cpu::softplus_backward(x, negative, scale.cpu(), out);
  }
  return out;
}

Tensor softplus_backward(const Tensor& x, bool negative, const Tensor& scale) {
  check_per_sample(scale, x, 1, "scale");
  return softplus_backward_scaled_by(x, negative, BackwardScale(scale, x, nullptr));
}

// The tail of a per-sample loss over the batch (sample_loss_tail.h): (loss, saved), loss () for
// mean, else (B,). sums: (B * chunks_per_sample, n), the reduction's partial sums when
// chunks_per_sample > 1 (CUDA only: sample_sums with chunk_partials).
std::tuple<Tensor, Tensor> sample_loss_tail_impl(const Tensor& sums, int64_t chunks_per_sample,
                                                 const optional<Tensor>& weight, const optional<Tensor>& t,
                                                 const optional<Tensor>& logvar, int64_t kind,
                                                 at::ArrayRef<double> params, int64_t numel, bool mean) {
  TORCH_CHECK(kind >= 0 && kind < kLossTails, "sample_loss_tail: unknown kind ", kind);
  TORCH_CHECK(params.size() <= kTailParams, "sample_loss_tail: at most ", kTailParams, " params");
  TORCH_CHECK(numel >= 1, "sample_loss_tail: numel must be positive, got ", numel);
  const auto tail_kind = static_cast<LossTail>(kind);
  TORCH_CHECK(chunks_per_sample >= 1 && (chunks_per_sample == 1 || sums.is_cuda()),
              "sample_loss_tail: partial sums are a CUDA reduction's");
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) >= 1 && sums.size(0) % chunks_per_sample == 0 &&
                  sums.size(1) == tail_sums(tail_kind) &&
                  sums.is_contiguous() && (sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble),
              "sample_loss_tail: sums must be a contiguous (B, ", tail_sums(tail_kind), ") fp32/fp64 tensor, got ",
              sums.sizes(), " ", sums.scalar_type());
  const int64_t batch = sums.size(0) / chunks_per_sample;
  auto per_sample = [&](const optional<Tensor>& p, const char* name) -> const Tensor* {
    if (!p) return nullptr;
    TORCH_CHECK(p->dim() == 1 && p->size(0) == batch && p->is_contiguous() &&
                    p->scalar_type() == sums.scalar_type() && p->device() == sums.device(),
                "sample_loss_tail: ", name, " must be a contiguous (B,) tensor of the sums' dtype and device");
    return &*p;
  };
  const Tensor* w = per_sample(weight, "weight");
  const Tensor* tt = per_sample(t, "t");
  const Tensor* u = per_sample(logvar, "logvar");
  LossTailArgs args{tail_kind, {0.0, 0.0, 0.0, 0.0}, numel, mean ? 1.0 / static_cast<double>(batch) : 1.0};
  for (size_t i = 0; i < params.size(); ++i) args.params[i] = params[i];
  Tensor loss = mean ? at::empty({}, sums.options()) : at::empty({batch}, sums.options());
  Tensor saved = at::empty({batch, tail_saved(tail_kind)}, sums.options());
  if (sums.is_cuda()) {
#ifdef FASTGEN_WITH_CUDA
    TORCH_CHECK(sums.scalar_type() == at::kFloat, "sample_loss_tail: CUDA sums must be fp32");
    const c10::cuda::CUDAGuard guard(sums.device());
    auto ptr = [](const Tensor* p) { return p ? p->const_data_ptr<float>() : nullptr; };
    cuda::SampleLossTailArgs launch{args, sums.const_data_ptr<float>(), chunks_per_sample, ptr(w), ptr(tt), ptr(u),
                                    loss.mutable_data_ptr<float>(), saved.mutable_data_ptr<float>(), batch, mean};
    check_launch(cuda::launch_sample_loss_tail(launch, c10::cuda::getCurrentCUDAStream()), "sample_loss_tail");
#endif
  } else {
    cpu::sample_loss_tail(args, sums, w, tt, u, mean, loss, saved);
  }
  return {loss, saved};
}

std::tuple<Tensor, Tensor> sample_loss_tail(const Tensor& sums, const optional<Tensor>& weight,
                                            const optional<Tensor>& t, const optional<Tensor>& logvar,
                                            int64_t kind, at::ArrayRef<double> params, int64_t numel,
                                            bool mean) {
  return sample_loss_tail_impl(sums, 1, weight, t, logvar, kind, params, numel, mean);
}

// The sums of a loss for its tail (sample_loss_tail_impl): the partial sums on CUDA, with the
// number of chunks per sample.
std::pair<Tensor, int64_t> sums_for_tail(const Tensor& sums_or_partials, const Tensor& x) {
  return {sums_or_partials, sums_or_partials.size(0) / x.size(0)};
}

// The losses with their autograd in C++: what the Python ops (fastgen_kernels/ops/*_loss.py,
// squared_residual.py) do in plain eager mode, without Python between the kernels. A loss is
// host-bound at training sizes on a GPU, where each Python-level step costs as much as a kernel.
// Forward: the sums and the tail (sample_loss_tail.h); backward: one elementwise pass scaled by
// s_b = g saved[b, 0].

// At the start of a loss's backward: whether the loss itself has a gradient (its forward turned
// materialize_grads off). The kernels' outputs have no derivative, so a create_graph=True backward
// raises instead of returning gradients that would differentiate as constants, and so does a
// gradient reaching the saved factors (the op's second output, which only a second derivative
// through a weight's or the log-variance's gradient would reach).
bool loss_gradient_flows(const char* op, const torch::autograd::variable_list& grads) {
  TORCH_CHECK(!at::GradMode::is_enabled() && !grads[1].defined(), op,
              ": the fused loss has no second derivative (create_graph=True)");
  return grads[0].defined();
}

// g * factors[b, column] for the upstream gradient g, () or (B,): a (B,) product.
Tensor backward_product(const Tensor& factors, int64_t column, const Tensor& grad) {
  return factors.select(1, column) * grad;
}

std::tuple<Tensor, Tensor> loss_and_saved(const torch::autograd::variable_list& out) {
  return {out[0], out[1]};
}

// Squared residual: da = g saved[:, 0] r (db = -da), dweight = g saved[:, 1].
class SquaredResidualLoss : public torch::autograd::Function<SquaredResidualLoss> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& a,
                                                const Tensor& b, const optional<Tensor>& c,
                                                const optional<Tensor>& k, const optional<Tensor>& weight,
                                                double scale, double huber, double power, double offset,
                                                bool mean) {
    const optional<Tensor> k_opt = k ? optional<Tensor>(k->to(stat_dtype(a)).contiguous()) : std::nullopt;
    const optional<Tensor> w_opt = weight ? optional<Tensor>(weight->to(stat_dtype(a)).contiguous()) : std::nullopt;
    const auto [sums, chunks] = sums_for_tail(squared_residual_sums(a, b, c, k_opt, true), a);
    auto [loss, saved] = sample_loss_tail_impl(sums, chunks, w_opt, std::nullopt, std::nullopt,
                                               static_cast<int64_t>(LossTail::kSquared),
                                               {scale, huber, power, offset}, a.numel() / a.size(0), mean);
    ctx->save_for_backward({a, b, c.value_or(Tensor()), k_opt.value_or(Tensor()), saved});
    // needs_input_grad counts the tensor inputs given (absent optionals have no edge)
    ctx->saved_data["weight_edge"] = weight ? int64_t{2} + c.has_value() + k.has_value() : int64_t{-1};
    ctx->set_materialize_grads(false);
    return {loss, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!loss_gradient_flows("squared_residual_loss", grads)) return torch::autograd::variable_list(10);
    const auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &b = saved[1], &c = saved[2], &k = saved[3], &factors = saved[4];
    const bool needs_a = ctx->needs_input_grad(0), needs_b = ctx->needs_input_grad(1);
    Tensor da, db, dweight;
    if (needs_a || needs_b) {
      const optional<Tensor> c_opt = c.defined() ? optional<Tensor>(c) : std::nullopt;
      const optional<Tensor> k_opt = k.defined() ? optional<Tensor>(k) : std::nullopt;
      const BackwardScale scale(factors.select(1, 0), a, &grads[0]);
      std::tie(da, db) = scaled_residual_scaled_by(a, b, c_opt, k_opt, scale, needs_b);
    }
    const int64_t weight_edge = ctx->saved_data["weight_edge"].toInt();
    if (weight_edge >= 0 && ctx->needs_input_grad(weight_edge)) dweight = backward_product(factors, 1, grads[0]);
    return {needs_a ? da : Tensor(), needs_b ? db : Tensor(), Tensor(), Tensor(), dweight, Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> squared_residual_loss(const Tensor& a, const Tensor& b, const optional<Tensor>& c,
                                                 const optional<Tensor>& k, const optional<Tensor>& weight,
                                                 double scale, double huber, double power, double offset,
                                                 bool mean) {
  const optional<Tensor> c_contiguous = c ? optional<Tensor>(c->contiguous()) : std::nullopt;
  return loss_and_saved(SquaredResidualLoss::apply(a.contiguous(), b.contiguous(), c_contiguous, k, weight, scale,
                                                   huber, power, offset, mean));
}

// VSD: dx_g = g saved[:, 0] (Fk - T); teacher, fake and weight are constants.
class VsdLoss : public torch::autograd::Function<VsdLoss> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x_g,
                                                const Tensor& teacher, const Tensor& fake,
                                                const optional<Tensor>& weight, double eps, bool mean) {
    const optional<Tensor> w_opt = weight ? optional<Tensor>(weight->to(stat_dtype(x_g)).contiguous()) : std::nullopt;
    const auto [sums, chunks] = sums_for_tail(vsd_loss_sums(x_g, teacher, fake, true), x_g);
    auto [loss, saved] = sample_loss_tail_impl(sums, chunks, w_opt, std::nullopt, std::nullopt,
                                               static_cast<int64_t>(LossTail::kVsd), {eps},
                                               x_g.numel() / x_g.size(0), mean);
    ctx->save_for_backward({teacher, fake, saved});
    ctx->set_materialize_grads(false);
    return {loss, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!loss_gradient_flows("vsd_loss", grads)) return torch::autograd::variable_list(6);
    const auto saved = ctx->get_saved_variables();
    Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = std::get<0>(scaled_residual_scaled_by(saved[1], saved[0], std::nullopt, std::nullopt,
                                                 BackwardScale(saved[2].select(1, 0), saved[1], &grads[0]), false));
    }
    return {dx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> vsd_loss(const Tensor& x_g, const Tensor& teacher, const Tensor& fake,
                                    const optional<Tensor>& weight, double eps, bool mean) {
  return loss_and_saved(VsdLoss::apply(x_g.contiguous(), teacher.contiguous(), fake.contiguous(), weight, eps, mean));
}

// Softplus (GAN): dx = g saved[:, 0] sign sigmoid(z).
class SoftplusLoss : public torch::autograd::Function<SoftplusLoss> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                bool negative, bool mean) {
    const auto [sums, chunks] = sums_for_tail(softplus_sums(x, negative, true), x);
    auto [loss, saved] = sample_loss_tail_impl(sums, chunks, std::nullopt, std::nullopt, std::nullopt,
                                               static_cast<int64_t>(LossTail::kSoftplus), {},
                                               x.numel() / x.size(0), mean);
    ctx->save_for_backward({x, saved});
    ctx->set_materialize_grads(false);
    ctx->saved_data["negative"] = negative;
    return {loss, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!loss_gradient_flows("softplus_loss", grads)) return torch::autograd::variable_list(3);
    const auto saved = ctx->get_saved_variables();
    Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = softplus_backward_scaled_by(saved[0], ctx->saved_data["negative"].toBool(),
                                       BackwardScale(saved[1].select(1, 0), saved[0], &grads[0]));
    }
    return {dx, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> softplus_loss(const Tensor& x, bool negative, bool mean) {
  return loss_and_saved(SoftplusLoss::apply(x.contiguous(), negative, mean));
}

// sCM: dF = g saved[:, 0] (d - q . (F_minus, dxt_dt, jvp, x_t)) with q = saved[:, 2:6],
// dlogvar = g saved[:, 1]; F_minus, dxt_dt, jvp, x_t and t are constants.
class ScmLoss : public torch::autograd::Function<ScmLoss> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& F,
                                                const Tensor& F_minus, const Tensor& dxt_dt, const Tensor& jvp,
                                                const Tensor& x_t, const Tensor& t, const Tensor& logvar,
                                                double sigma_data, double warmup, double c, bool mean) {
    const Tensor t_stat = t.to(stat_dtype(F)).contiguous();
    const auto [sums, chunks] =
        sums_for_tail(scm_loss_sums(F, F_minus, dxt_dt, jvp, x_t, t_stat, sigma_data, warmup, true), F);
    const Tensor u = logvar.to(stat_dtype(F)).contiguous();
    auto [loss, saved] = sample_loss_tail_impl(sums, chunks, std::nullopt, t_stat, u,
                                               static_cast<int64_t>(LossTail::kScm), {sigma_data, warmup, c},
                                               F.numel() / F.size(0), mean);
    ctx->save_for_backward({F, F_minus, dxt_dt, jvp, x_t, saved});
    ctx->set_materialize_grads(false);
    return {loss, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!loss_gradient_flows("scm_loss", grads)) return torch::autograd::variable_list(11);
    const auto saved = ctx->get_saved_variables();
    const Tensor& factors = saved[5];
    Tensor dF, dlogvar;
    if (ctx->needs_input_grad(0)) {
      dF = scm_loss_backward_scaled_by(saved[0], saved[1], saved[2], saved[3], saved[4], factors.narrow(1, 2, 4),
                                       BackwardScale(factors.select(1, 0), saved[0], &grads[0]));
    }
    if (ctx->needs_input_grad(6)) dlogvar = backward_product(factors, 1, grads[0]);
    return {dF, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), dlogvar, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> scm_loss(const Tensor& F, const Tensor& F_minus, const Tensor& dxt_dt, const Tensor& jvp,
                                    const Tensor& x_t, const Tensor& t, const Tensor& logvar, double sigma_data,
                                    double warmup, double c, bool mean) {
  return loss_and_saved(ScmLoss::apply(F.contiguous(), F_minus.contiguous(), dxt_dt.contiguous(), jvp.contiguous(),
                                       x_t.contiguous(), t, logvar, sigma_data, warmup, c, mean));
}

// GELU(tanh), CPU only (on a GPU PyTorch's own one-pass kernel is the peer; the fusion that pays
// there is into the GEMM's epilogue).
Tensor gelu_tanh_forward(const Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "gelu_tanh: x must be contiguous");
  Tensor out = at::empty_like(x);
  cpu::gelu_tanh_forward(x, out);
  return out;
}

Tensor gelu_tanh_backward(const Tensor& grad_out, const Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && grad_out.is_contiguous(), "gelu_tanh_backward: inputs must be contiguous");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "gelu_tanh_backward: grad_out must match x ", x.sizes(), " ", x.scalar_type(), ", got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  Tensor out = at::empty_like(x);
  cpu::gelu_tanh_backward(grad_out, x, out);
  return out;
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY(fastgen_C, m) {
  m.def("modulated_norm_forward(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, "
        "float eps, bool rms, ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def("modulated_norm_backward(Tensor grad_out, Tensor x, Tensor shift, Tensor scale, "
        "Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, bool rms) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("modulated_norm_jvp(Tensor x, Tensor scale, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "bool rms, Tensor? tx, Tensor? tshift, Tensor? tscale, Tensor? tweight, Tensor? tbias, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("gated_residual_forward(Tensor x, Tensor y, Tensor gate, Tensor? y2=None, Tensor? gate2=None) -> Tensor");
  m.def("gated_residual_backward(Tensor grad_out, Tensor y, Tensor gate) -> (Tensor, Tensor)");
  m.def("gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor");
  m.def("modulated_norm_linear(Tensor x, Tensor shift, Tensor scale, Tensor? norm_weight, Tensor? norm_bias, "
        "float eps, bool rms, Tensor weight, Tensor? bias, ScalarType? norm_out_dtype=None) -> Tensor");
  m.def("qk_norm_rope_forward(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos, "
        "Tensor? sin, float eps, bool interleaved) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, "
        "Tensor? q_weight, Tensor? k_weight, Tensor? cos, Tensor? sin, Tensor q_rstd, "
        "Tensor k_rstd, bool interleaved) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_jvp(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos, Tensor? sin, "
        "Tensor q_rstd, Tensor k_rstd, bool interleaved, Tensor? tq, Tensor? tk, Tensor? tq_weight, "
        "Tensor? tk_weight) -> (Tensor, Tensor)");
  m.def("vsd_loss_sums(Tensor x_g, Tensor x0_teacher, Tensor x0_fake) -> Tensor");
  m.def("squared_residual_sums(Tensor a, Tensor b, Tensor? c, Tensor? k) -> Tensor");
  m.def("scaled_residual(Tensor a, Tensor b, Tensor? c, Tensor? k, Tensor scale, bool negated) "
        "-> (Tensor, Tensor)");
  m.def("scm_loss_sums(Tensor F, Tensor F_minus, Tensor dxt_dt, Tensor jvp, Tensor x_t, Tensor t, "
        "float sigma_data, float warmup) -> Tensor");
  m.def("scm_loss_backward(Tensor F, Tensor F_minus, Tensor dxt_dt, Tensor jvp, Tensor x_t, "
        "Tensor coef, Tensor scale) -> Tensor");
  m.def("softplus_sums(Tensor x, bool negative) -> Tensor");
  m.def("softplus_backward(Tensor x, bool negative, Tensor scale) -> Tensor");
  m.def("sample_loss_tail(Tensor sums, Tensor? weight, Tensor? t, Tensor? logvar, int kind, "
        "float[] params, int numel, bool mean) -> (Tensor, Tensor)");
  m.def("squared_residual_loss(Tensor a, Tensor b, Tensor? c, Tensor? k, Tensor? weight, float scale, "
        "float huber, float power, float offset, bool mean) -> (Tensor, Tensor)");
  m.def("vsd_loss(Tensor x_g, Tensor x0_teacher, Tensor x0_fake, Tensor? weight, float eps, bool mean) "
        "-> (Tensor, Tensor)");
  m.def("softplus_loss(Tensor x, bool negative, bool mean) -> (Tensor, Tensor)");
  m.def("scm_loss(Tensor F, Tensor F_minus, Tensor dxt_dt, Tensor jvp, Tensor x_t, Tensor t, Tensor logvar, "
        "float sigma_data, float warmup, float c, bool mean) -> (Tensor, Tensor)");
  m.def("gelu_tanh_forward(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad_out, Tensor x) -> Tensor");
  // The instruction set of the CPU kernels (csrc/cpu/isa.h): returns the current one after
  // setting `isa` ("avx512", "avx2" or "baseline") when given.
  m.def("cpu_isa(str? isa=None) -> str", [](std::optional<std::string> isa) {
    if (isa.has_value()) fastgen::cpu::set_cpu_isa(*isa);
    return fastgen::cpu::cpu_isa();
  });
}

namespace {
// Every implementation takes CPU and CUDA tensors alike (it branches on the device), so the two
// dispatch keys register the same functions.
void register_kernels(torch::Library& m) {
  m.impl("modulated_norm_forward", &fastgen::modulated_norm_forward);
  m.impl("modulated_norm_backward", &fastgen::modulated_norm_backward);
  m.impl("modulated_norm_jvp", &fastgen::modulated_norm_jvp);
  m.impl("gated_residual_forward", &fastgen::gated_residual_forward);
  m.impl("gated_residual_backward", &fastgen::gated_residual_backward);
  m.impl("qk_norm_rope_forward", &fastgen::qk_norm_rope_forward);
  m.impl("qk_norm_rope_backward", &fastgen::qk_norm_rope_backward);
  m.impl("qk_norm_rope_jvp", &fastgen::qk_norm_rope_jvp);
  m.impl("vsd_loss_sums", [](const at::Tensor& x_g, const at::Tensor& teacher, const at::Tensor& fake) {
    return fastgen::vsd_loss_sums(x_g, teacher, fake);
  });
  m.impl("squared_residual_sums", [](const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                                     const std::optional<at::Tensor>& k) {
    return fastgen::squared_residual_sums(a, b, c, k);
  });
  m.impl("scaled_residual", &fastgen::scaled_residual);
  m.impl("scm_loss_sums", [](const at::Tensor& F, const at::Tensor& F_minus, const at::Tensor& dxt_dt,
                             const at::Tensor& jvp, const at::Tensor& x_t, const at::Tensor& t, double sigma_data,
                             double warmup) {
    return fastgen::scm_loss_sums(F, F_minus, dxt_dt, jvp, x_t, t, sigma_data, warmup);
  });
  m.impl("scm_loss_backward", &fastgen::scm_loss_backward);
  m.impl("softplus_sums", [](const at::Tensor& x, bool negative) { return fastgen::softplus_sums(x, negative); });
  m.impl("softplus_backward", &fastgen::softplus_backward);
  m.impl("sample_loss_tail", &fastgen::sample_loss_tail);
}
}  // namespace

// The ops whose autograd is C++ (the Python ops' eager fast path: the losses, the gated residual,
// the modulated norm + linear layer):
// one kernel for every device, which records its own autograd node, and also runs where autograd
// is off (inference mode).
TORCH_LIBRARY_IMPL(fastgen_C, CompositeImplicitAutograd, m) {
  m.impl("squared_residual_loss", &fastgen::squared_residual_loss);
  m.impl("vsd_loss", &fastgen::vsd_loss);
  m.impl("softplus_loss", &fastgen::softplus_loss);
  m.impl("scm_loss", &fastgen::scm_loss);
  m.impl("gated_residual", &fastgen::gated_residual);
  m.impl("modulated_norm_linear", &fastgen::modulated_norm_linear);
}

TORCH_LIBRARY_IMPL(fastgen_C, CPU, m) {
  register_kernels(m);
  m.impl("gelu_tanh_forward", &fastgen::gelu_tanh_forward);
  m.impl("gelu_tanh_backward", &fastgen::gelu_tanh_backward);
}

#ifdef FASTGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgen_C, CUDA, m) { register_kernels(m); }
#define FASTGEN_CUDA_BUILT 1
#else
#define FASTGEN_CUDA_BUILT 0
#endif

// A plain Python module: importing fastgen_kernels._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastgen_kernels C++/CUDA kernels, as torch.ops.fastgen_C.*", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddIntConstant(m, "cuda_built", FASTGEN_CUDA_BUILT) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
