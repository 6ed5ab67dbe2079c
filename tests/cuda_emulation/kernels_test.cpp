// The CUDA kernels of csrc/cuda run under emu.h against fp64 references written here from their
// formulas (launch.h documents each launcher's arguments): the modulated norm's forward, backward
// and JVP, the gated residual's, QK-norm + rotary's forward, backward and JVP, and the losses'
// per-sample tail. Every output starts as NaN, so an element no thread writes fails. Run by
// tests/test_cuda_emulation.py; "full" adds the widest rows (4608 to 8192 columns), which take
// minutes.
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>

#include "cuda/launch.h"
#include "emu.h"

using fastgen::RowChunks;
using fastgen::cuda::DType;

namespace {

std::mt19937 rng(1234);
int failures = 0;

double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }
size_t itemsize(DType d) { return d == DType::kFloat32 ? 4 : 2; }
const char* name(DType d) { return d == DType::kFloat32 ? "f32" : d == DType::kFloat16 ? "f16" : "bf16"; }
double rounding(DType d) { return d == DType::kFloat32 ? 1e-6 : d == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128; }

// n elements of dtype, optionally starting `offset` elements past a 32-byte boundary (the
// kernels take their scalar path for misaligned operands)
class Buffer {
 public:
  Buffer(DType dtype, size_t n, int offset = 0)
      : dtype_(dtype), n_(n), offset_(offset), raw_((n + offset) * itemsize(dtype) + 64) {}
  void* data() {
    const auto aligned = (reinterpret_cast<uintptr_t>(raw_.data()) + 31) & ~uintptr_t(31);
    return reinterpret_cast<void*>(aligned + offset_ * itemsize(dtype_));
  }
  size_t size() const { return n_; }
  void set(size_t i, double v) {
    if (dtype_ == DType::kFloat32) static_cast<float*>(data())[i] = static_cast<float>(v);
    else if (dtype_ == DType::kFloat16) static_cast<__half*>(data())[i] = __float2half_rn(static_cast<float>(v));
    else static_cast<__nv_bfloat16*>(data())[i] = __float2bfloat16_rn(static_cast<float>(v));
  }
  double get(size_t i) {
    if (dtype_ == DType::kFloat32) return static_cast<float*>(data())[i];
    if (dtype_ == DType::kFloat16) return __half2float(static_cast<__half*>(data())[i]);
    return __bfloat162float(static_cast<__nv_bfloat16*>(data())[i]);
  }
  Buffer& random(double scale = 1.0, double shift = 0.0) {
    for (size_t i = 0; i < n_; ++i) set(i, scale * normal() + shift);
    return *this;
  }
  Buffer& nan() {
    for (size_t i = 0; i < n_; ++i) set(i, NAN);
    return *this;
  }

 private:
  DType dtype_;
  size_t n_;
  int offset_;
  std::vector<unsigned char> raw_;
};

// got within rel * (|want| + scale) of want everywhere, none NaN (unwritten)
void expect_close(const char* what, const std::string& config, Buffer& got, const std::vector<double>& want,
                  double rel, double scale) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got.get(i);
    if (std::isnan(g) || std::abs(g - want[i]) > rel * (std::abs(want[i]) + scale)) {
      ++failures;
      std::printf("FAIL %s %s: element %zu is %g, expected %g\n", what, config.c_str(), i, g, want[i]);
      return;
    }
  }
}

void expect_close(const char* what, const std::string& config, const std::vector<float>& got,
                  const std::vector<double>& want, double rel, double scale) {
  Buffer buffer(DType::kFloat32, got.size());
  for (size_t i = 0; i < got.size(); ++i) buffer.set(i, got[i]);
  expect_close(what, config, buffer, want, rel, scale);
}

// sums over the chunks of partials (num_chunks, dim), per batch or over all of them
std::vector<float> chunk_sums(const float* partials, int64_t num_chunks, int64_t chunks_per_batch, int64_t batch,
                              int64_t dim, bool per_batch) {
  std::vector<float> out(per_batch ? batch * dim : dim, 0.f);
  for (int64_t k = 0; k < num_chunks; ++k)
    for (int64_t c = 0; c < dim; ++c) out[(per_batch ? k / chunks_per_batch * dim : 0) + c] += partials[k * dim + c];
  return out;
}

struct NormCase {
  DType dtype, other;  // x's; the output's and grad_out's (x's, or bf16/fp16 with fp32 x)
  int64_t batch, tokens, dim;
  bool shift_per_token, scale_per_token, weight, bias, rms;
  int offset;          // misalignment of x, in elements
  int64_t chunk_target;
};

void modulated_norm(const NormCase& k) {
  const int64_t R = k.batch * k.tokens, D = k.dim;
  char text[200];
  std::snprintf(text, sizeof text, "x=%s other=%s B=%lld L=%lld D=%lld shift_tok=%d scale_tok=%d w=%d b=%d rms=%d "
                "offset=%d chunks=%lld", name(k.dtype), name(k.other), (long long)k.batch, (long long)k.tokens,
                (long long)D, k.shift_per_token, k.scale_per_token, k.weight, k.bias, k.rms, k.offset,
                (long long)k.chunk_target);
  const std::string config = text;
  Buffer x(k.dtype, R * D, k.offset), shift(k.dtype, (k.shift_per_token ? R : k.batch) * D),
      scale(k.dtype, (k.scale_per_token ? R : k.batch) * D), weight(k.dtype, D), bias(k.dtype, D);
  x.random(2.0, 0.5);
  shift.random();
  scale.random();
  weight.random();
  bias.random();
  Buffer out(k.other, R * D);
  out.nan();
  std::vector<float> mean(R, NAN), rstd(R, NAN);
  const float eps = 1e-6f;
  const fastgen::cuda::ModulatedNormForwardArgs forward{
      k.dtype, k.other, x.data(), shift.data(), scale.data(), k.weight ? weight.data() : nullptr,
      k.bias ? bias.data() : nullptr, out.data(), k.rms ? nullptr : mean.data(), rstd.data(), R, k.tokens, D,
      k.shift_per_token, k.scale_per_token, k.rms, eps};
  if (fastgen::cuda::launch_modulated_norm_forward(forward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL forward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> y(R * D), mu(R), rs(R), xhat(R * D);
  for (int64_t r = 0; r < R; ++r) {
    double m = 0, var = 0;
    if (!k.rms)
      for (int64_t c = 0; c < D; ++c) m += x.get(r * D + c) / D;
    for (int64_t c = 0; c < D; ++c) var += (x.get(r * D + c) - m) * (x.get(r * D + c) - m) / D;
    mu[r] = m;
    rs[r] = 1 / std::sqrt(var + eps);
    const int64_t shift_row = k.shift_per_token ? r : r / k.tokens, scale_row = k.scale_per_token ? r : r / k.tokens;
    for (int64_t c = 0; c < D; ++c) {
      xhat[r * D + c] = (x.get(r * D + c) - m) * rs[r];
      const double n = xhat[r * D + c] * (k.weight ? weight.get(c) : 1) + (k.bias ? bias.get(c) : 0);
      y[r * D + c] = n * (1 + scale.get(scale_row * D + c)) + shift.get(shift_row * D + c);
    }
  }
  expect_close("forward y", config, out, y, 2 * rounding(k.other) + 2e-5, 1.0);
  if (!k.rms) expect_close("forward mean", config, mean, mu, 1e-5, 1.0);
  expect_close("forward rstd", config, rstd, rs, 1e-5, 0.0);

  // The JVP with the forward's statistics, in three subsets of tangents: every one (tshift's layout
  // the other of shift's, so the two are covered independently); none of tx (the kernel that takes
  // no row sums); tx with a tscale laid out the other way from scale, the others absent. tx and ty
  // are misaligned with x.
  Buffer tx(k.dtype, R * D, k.offset), tshift(k.dtype, (k.shift_per_token ? k.batch : R) * D),
      tscale(k.dtype, (k.scale_per_token ? R : k.batch) * D),
      tscale_other(k.dtype, (k.scale_per_token ? k.batch : R) * D), tweight(k.dtype, D), tbias(k.dtype, D);
  tx.random();
  tshift.random();
  tscale.random();
  tscale_other.random();
  tweight.random();
  tbias.random();
  struct Subset {
    const char* what;
    bool tx, tshift, tscale_other, tweight_tbias;
  };
  for (const Subset t : {Subset{"jvp ty", true, true, false, true},
                         Subset{"jvp ty without tx", false, true, false, true},
                         Subset{"jvp ty of tx and tscale", true, false, true, false}}) {
    Buffer& tsc = t.tscale_other ? tscale_other : tscale;
    const bool tscale_tok = t.tscale_other ? !k.scale_per_token : k.scale_per_token;
    const bool with_tw = t.tweight_tbias && k.weight, with_tb = t.tweight_tbias && k.bias;
    Buffer ty(k.other, R * D, k.offset);
    ty.nan();
    const fastgen::cuda::ModulatedNormJvpArgs jvp{
        k.dtype, k.other, x.data(), scale.data(), k.weight ? weight.data() : nullptr, k.bias ? bias.data() : nullptr,
        k.rms ? nullptr : mean.data(), rstd.data(), t.tx ? tx.data() : nullptr, t.tshift ? tshift.data() : nullptr,
        tsc.data(), with_tw ? tweight.data() : nullptr, with_tb ? tbias.data() : nullptr, ty.data(), R, k.tokens, D,
        k.scale_per_token, !k.shift_per_token, tscale_tok, k.rms};
    if (fastgen::cuda::launch_modulated_norm_jvp(jvp, nullptr) != cudaSuccess) {
      ++failures;
      std::printf("FAIL jvp launch refused %s\n", config.c_str());
      return;
    }
    std::vector<double> want_ty(R * D);
    double ty_scale = 0;
    for (int64_t r = 0; r < R; ++r) {
      double sum_tx = 0, sum_tx_xhat = 0;
      for (int64_t c = 0; c < D; ++c) {
        sum_tx += t.tx ? tx.get(r * D + c) : 0;
        sum_tx_xhat += t.tx ? tx.get(r * D + c) * xhat[r * D + c] : 0;
      }
      const int64_t tshift_row = k.shift_per_token ? r / k.tokens : r;
      const int64_t scale_row = k.scale_per_token ? r : r / k.tokens, tscale_row = tscale_tok ? r : r / k.tokens;
      for (int64_t c = 0; c < D; ++c) {
        const double xh = xhat[r * D + c], w = k.weight ? weight.get(c) : 1, b = k.bias ? bias.get(c) : 0;
        const double txhat =
            t.tx ? rs[r] * (tx.get(r * D + c) - (k.rms ? 0 : sum_tx / D) - xh * sum_tx_xhat / D) : 0;
        const double tn = txhat * w + (with_tw ? xh * tweight.get(c) : 0) + (with_tb ? tbias.get(c) : 0);
        want_ty[r * D + c] = tn * (1 + scale.get(scale_row * D + c)) + (xh * w + b) * tsc.get(tscale_row * D + c) +
                             (t.tshift ? tshift.get(tshift_row * D + c) : 0);
        ty_scale = std::max(ty_scale, std::abs(want_ty[r * D + c]));
      }
    }
    expect_close(t.what, config, ty, want_ty, 2 * rounding(k.other) + 1e-5, ty_scale);
  }

  Buffer grad(k.other, R * D);
  grad.random();
  const RowChunks chunks = fastgen::row_chunks(k.batch, k.tokens, k.chunk_target);
  const int64_t num_chunks = k.batch * chunks.chunks_per_batch;
  Buffer dx(k.dtype, R * D), dshift(k.dtype, R * D), dscale(k.dtype, R * D);
  dx.nan();
  dshift.nan();
  dscale.nan();
  std::vector<float> partials(4 * num_chunks * D, NAN);
  const fastgen::cuda::ModulatedNormBackwardArgs backward{
      k.dtype, k.other, grad.data(), x.data(), scale.data(), k.weight ? weight.data() : nullptr,
      k.bias ? bias.data() : nullptr, k.rms ? nullptr : mean.data(), rstd.data(), dx.data(),
      k.shift_per_token ? dshift.data() : nullptr, k.scale_per_token ? dscale.data() : nullptr, partials.data(), R,
      k.tokens, D, chunks.rows_per_chunk, chunks.chunks_per_batch, k.shift_per_token, k.scale_per_token, k.rms};
  if (fastgen::cuda::launch_modulated_norm_backward(backward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL backward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> want_dx(R * D), dshift_token(R * D), dscale_token(R * D), dshift_batch(k.batch * D, 0),
      dscale_batch(k.batch * D, 0), dweight(D, 0), dbias(D, 0);
  double dx_scale = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t scale_row = k.scale_per_token ? r : r / k.tokens;
    std::vector<double> gx(D);
    double sum_gx = 0, sum_gx_xhat = 0;
    for (int64_t c = 0; c < D; ++c) {
      const double g = grad.get(r * D + c), gn = g * (1 + scale.get(scale_row * D + c));
      const double n = xhat[r * D + c] * (k.weight ? weight.get(c) : 1) + (k.bias ? bias.get(c) : 0);
      gx[c] = gn * (k.weight ? weight.get(c) : 1);
      sum_gx += gx[c];
      sum_gx_xhat += gx[c] * xhat[r * D + c];
      dshift_token[r * D + c] = g;
      dscale_token[r * D + c] = g * n;
      dshift_batch[r / k.tokens * D + c] += g;
      dscale_batch[r / k.tokens * D + c] += g * n;
      dweight[c] += gn * xhat[r * D + c];
      dbias[c] += gn;
    }
    for (int64_t c = 0; c < D; ++c) {
      want_dx[r * D + c] = rs[r] * (gx[c] - (k.rms ? 0 : sum_gx / D) - xhat[r * D + c] * sum_gx_xhat / D);
      dx_scale = std::max(dx_scale, rs[r] * std::abs(gx[c]));
    }
  }
  expect_close("backward dx", config, dx, want_dx, 4 * rounding(k.dtype) + 1e-4, dx_scale);
  if (k.shift_per_token) expect_close("backward dshift", config, dshift, dshift_token, 2 * rounding(k.dtype), 1.0);
  if (k.scale_per_token) expect_close("backward dscale", config, dscale, dscale_token, 2 * rounding(k.dtype), 1.0);
  const double sum_scale = 3 * std::sqrt(static_cast<double>(k.tokens));
  const auto slot = [&](int s, bool per_batch) {
    return chunk_sums(partials.data() + s * num_chunks * D, num_chunks, chunks.chunks_per_batch, k.batch, D,
                      per_batch);
  };
  if (k.weight) expect_close("backward dweight", config, slot(fastgen::kSlotWeight, false), dweight, 1e-4,
                             sum_scale * k.batch);
  if (k.bias) expect_close("backward dbias", config, slot(fastgen::kSlotBias, false), dbias, 1e-4, sum_scale * k.batch);
  if (!k.shift_per_token)
    expect_close("backward dshift", config, slot(fastgen::kSlotShift, true), dshift_batch, 1e-4, sum_scale);
  if (!k.scale_per_token)
    expect_close("backward dscale", config, slot(fastgen::kSlotScale, true), dscale_batch, 1e-4, sum_scale);
}

void gated_residual(DType dtype, DType operand, int64_t batch, int64_t tokens, int64_t dim, bool gate_per_token,
                    bool second_term, int offset, int64_t chunk_target) {
  const int64_t R = batch * tokens, D = dim;
  char text[160];
  std::snprintf(text, sizeof text, "x=%s operands=%s B=%lld L=%lld D=%lld gate_tok=%d second=%d offset=%d "
                "chunks=%lld", name(dtype), name(operand), (long long)batch, (long long)tokens, (long long)D,
                gate_per_token, second_term, offset, (long long)chunk_target);
  const std::string config = text;
  const int64_t gate_rows = gate_per_token ? R : batch;
  Buffer x(dtype, R * D), y(operand, R * D, offset), gate(operand, gate_rows * D), y2(operand, R * D),
      gate2(operand, batch * D), out(dtype, R * D);
  x.random();
  y.random();
  gate.random();
  y2.random();
  gate2.random();
  out.nan();
  const fastgen::cuda::GatedResidualForwardArgs forward{
      dtype, operand, x.data(), y.data(), gate.data(), second_term ? y2.data() : nullptr,
      second_term ? gate2.data() : nullptr, out.data(), R, tokens, D, gate_per_token, false};
  if (fastgen::cuda::launch_gated_residual_forward(forward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL gated residual forward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> want(R * D);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < D; ++c)
      want[r * D + c] = x.get(r * D + c) + gate.get((gate_per_token ? r : r / tokens) * D + c) * y.get(r * D + c) +
                        (second_term ? gate2.get(r / tokens * D + c) * y2.get(r * D + c) : 0);
  expect_close("gated residual out", config, out, want, 2 * rounding(dtype), 1.0);
  if (second_term) return;  // the backward has no second term

  Buffer grad(dtype, R * D), dy(operand, R * D), dgate(operand, R * D);
  grad.random();
  dy.nan();
  dgate.nan();
  const RowChunks chunks = fastgen::row_chunks(batch, tokens, chunk_target);
  const int64_t num_chunks = batch * chunks.chunks_per_batch;
  std::vector<float> partials(num_chunks * D, NAN);
  const fastgen::cuda::GatedResidualBackwardArgs backward{
      dtype, operand, grad.data(), y.data(), gate.data(), dy.data(), gate_per_token ? dgate.data() : nullptr,
      gate_per_token ? nullptr : partials.data(), R, tokens, D, chunks.rows_per_chunk, chunks.chunks_per_batch,
      gate_per_token};
  if (fastgen::cuda::launch_gated_residual_backward(backward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL gated residual backward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> want_dy(R * D), dgate_token(R * D), dgate_batch(batch * D, 0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < D; ++c) {
      want_dy[r * D + c] = grad.get(r * D + c) * gate.get((gate_per_token ? r : r / tokens) * D + c);
      dgate_token[r * D + c] = grad.get(r * D + c) * y.get(r * D + c);
      dgate_batch[r / tokens * D + c] += dgate_token[r * D + c];
    }
  expect_close("gated residual dy", config, dy, want_dy, 2 * rounding(operand), 1.0);
  if (gate_per_token) {
    expect_close("gated residual dgate", config, dgate, dgate_token, 2 * rounding(operand), 1.0);
  } else {
    expect_close("gated residual dgate", config,
                 chunk_sums(partials.data(), num_chunks, chunks.chunks_per_batch, batch, D, true), dgate_batch, 1e-5,
                 3 * std::sqrt(static_cast<double>(tokens)));
  }
}

// QK-norm + rotary of one head layout: x's heads sit among `extra` more per token (q sliced from a
// fused projection: strided rows), tx at the contiguous strides. rope: 0 none, 1 interleaved,
// 2 half (pairs (i, i + dim / 2)). Forward, backward (dx and the weight's chunk partials) and the
// JVP with and without tx, against fp64.
void qk_norm_rope(DType dtype, int64_t batch, int64_t tokens, int64_t heads, int64_t dim, bool weighted, int rope,
                  int64_t chunk_target) {
  const int64_t R = batch * tokens * heads, D = dim, extra = 1, H_all = heads + extra;
  char text[160];
  std::snprintf(text, sizeof text, "qk x=%s B=%lld L=%lld H=%lld D=%lld w=%d rope=%d chunks=%lld", name(dtype),
                (long long)batch, (long long)tokens, (long long)heads, (long long)D, weighted, rope,
                (long long)chunk_target);
  const std::string config = text;
  const int64_t stride_h = D, stride_l = H_all * D, stride_b = tokens * H_all * D;
  // tx at strides of its own: two more heads a token, and a gap between batches
  const int64_t tx_stride_h = D, tx_stride_l = (heads + 2) * D, tx_stride_b = tokens * tx_stride_l + D;
  Buffer x(dtype, batch * tokens * H_all * D), weight(dtype, D), tx(dtype, batch * tx_stride_b), tweight(dtype, D);
  x.random(2.0, 0.3);
  weight.random();
  tx.random();
  tweight.random();
  std::vector<float> cos(tokens * D), sin(tokens * D);
  for (auto& c : cos) c = static_cast<float>(normal());
  for (auto& v : sin) v = static_cast<float>(normal());
  const bool has_rope = rope != 0;
  const float eps = 1e-6f;
  const auto offset = [&](int64_t r) {  // row r = (b * tokens + l) * heads + h in x
    const int64_t h = r % heads, bl = r / heads;
    return (bl / tokens) * stride_b + (bl % tokens) * stride_l + h * stride_h;
  };
  const auto tx_offset = [&](int64_t r) {
    const int64_t h = r % heads, bl = r / heads;
    return (bl / tokens) * tx_stride_b + (bl % tokens) * tx_stride_l + h * tx_stride_h;
  };
  const auto token = [&](int64_t r) { return r / heads % tokens; };
  // the rotary map on a row v (and its transpose): pairs (a, b) as the kernels cut them
  const auto pairs = [&](int64_t p, int64_t& a, int64_t& b) {
    if (rope == 2) {
      a = p;
      b = p + D / 2;
    } else {
      a = 2 * p;
      b = a + 1;
    }
  };
  const auto rotate = [&](std::vector<double> v, int64_t l, bool transpose) {
    if (!has_rope) return v;
    std::vector<double> out(D);
    for (int64_t p = 0; p < D / 2; ++p) {
      int64_t a, b;
      pairs(p, a, b);
      const double ca = cos[l * D + a], cb = cos[l * D + b], sa = sin[l * D + a], sb = sin[l * D + b];
      out[a] = transpose ? v[a] * ca + v[b] * sb : v[a] * ca - v[b] * sa;
      out[b] = transpose ? v[b] * cb - v[a] * sa : v[b] * cb + v[a] * sb;
    }
    return out;
  };

  Buffer out(dtype, R * D);
  out.nan();
  std::vector<float> rstd(R, NAN);
  const fastgen::cuda::QkNormRopeForwardArgs forward{
      dtype, x.data(), weighted ? weight.data() : nullptr, has_rope ? cos.data() : nullptr,
      has_rope ? sin.data() : nullptr, out.data(), rstd.data(), R, tokens, heads, D, stride_b, stride_l, stride_h,
      rope == 1, eps};
  if (fastgen::cuda::launch_qk_norm_rope_forward(forward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL qk forward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> want(R * D), rs(R), xhat(R * D);
  for (int64_t r = 0; r < R; ++r) {
    double ms = 0;
    for (int64_t c = 0; c < D; ++c) ms += x.get(offset(r) + c) * x.get(offset(r) + c) / D;
    rs[r] = 1 / std::sqrt(ms + eps);
    std::vector<double> n(D);
    for (int64_t c = 0; c < D; ++c) {
      xhat[r * D + c] = x.get(offset(r) + c) * rs[r];
      n[c] = xhat[r * D + c] * (weighted ? weight.get(c) : 1);
    }
    const auto y = rotate(n, token(r), false);
    std::copy(y.begin(), y.end(), want.begin() + r * D);
  }
  expect_close("qk forward", config, out, want, 2 * rounding(dtype) + 2e-5, 4.0);
  expect_close("qk forward rstd", config, rstd, rs, 1e-5, 0.0);

  Buffer grad(dtype, R * D), dx(dtype, R * D);
  grad.random();
  dx.nan();
  const RowChunks chunks = fastgen::row_chunks(1, R, chunk_target);
  std::vector<float> partials(chunks.chunks_per_batch * D, NAN);
  const fastgen::cuda::QkNormRopeBackwardArgs backward{
      dtype, grad.data(), x.data(), weighted ? weight.data() : nullptr, has_rope ? cos.data() : nullptr,
      has_rope ? sin.data() : nullptr, rstd.data(), dx.data(), weighted ? partials.data() : nullptr, R, tokens,
      heads, D, stride_b, stride_l, stride_h, chunks.rows_per_chunk, chunks.chunks_per_batch, rope == 1};
  if (fastgen::cuda::launch_qk_norm_rope_backward(backward, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL qk backward launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> want_dx(R * D), dweight(D, 0);
  double dx_scale = 0;
  for (int64_t r = 0; r < R; ++r) {
    std::vector<double> g(D);
    for (int64_t c = 0; c < D; ++c) g[c] = grad.get(r * D + c);
    const auto dn = rotate(g, token(r), true);
    double proj = 0;
    for (int64_t c = 0; c < D; ++c) proj += dn[c] * (weighted ? weight.get(c) : 1) * xhat[r * D + c] / D;
    for (int64_t c = 0; c < D; ++c) {
      const double gw = dn[c] * (weighted ? weight.get(c) : 1);
      want_dx[r * D + c] = rs[r] * (gw - xhat[r * D + c] * proj);
      dx_scale = std::max(dx_scale, rs[r] * std::abs(gw));
      dweight[c] += dn[c] * xhat[r * D + c];
    }
  }
  expect_close("qk backward dx", config, dx, want_dx, 4 * rounding(dtype) + 1e-4, dx_scale);
  if (weighted)
    expect_close("qk backward dweight", config,
                 chunk_sums(partials.data(), chunks.chunks_per_batch, chunks.chunks_per_batch, 1, D, false), dweight,
                 1e-4, 3 * std::sqrt(static_cast<double>(R)));

  // (tx, tweight): both, tweight alone, tx alone (no tangent at all the binding answers itself)
  for (const auto [with_tx, with_tw] : {std::pair{true, true}, std::pair{false, true}, std::pair{true, false}}) {
    if (with_tw && !weighted) continue;
    Buffer tout(dtype, R * D);
    tout.nan();
    const fastgen::cuda::QkNormRopeJvpArgs jvp{
        dtype, x.data(), weighted ? weight.data() : nullptr, has_rope ? cos.data() : nullptr,
        has_rope ? sin.data() : nullptr, rstd.data(), with_tx ? tx.data() : nullptr,
        with_tw ? tweight.data() : nullptr, tout.data(), R, tokens, heads, D, stride_b, stride_l, stride_h,
        tx_stride_b, tx_stride_l, tx_stride_h, rope == 1};
    if (fastgen::cuda::launch_qk_norm_rope_jvp(jvp, nullptr) != cudaSuccess) {
      ++failures;
      std::printf("FAIL qk jvp launch refused %s\n", config.c_str());
      return;
    }
    std::vector<double> want_t(R * D);
    double t_scale = 0;
    for (int64_t r = 0; r < R; ++r) {
      double proj = 0;
      for (int64_t c = 0; c < D; ++c) proj += with_tx ? tx.get(tx_offset(r) + c) * xhat[r * D + c] / D : 0;
      std::vector<double> tn(D);
      for (int64_t c = 0; c < D; ++c) {
        const double txhat = with_tx ? rs[r] * (tx.get(tx_offset(r) + c) - xhat[r * D + c] * proj) : 0;
        tn[c] = txhat * (weighted ? weight.get(c) : 1) + (with_tw ? xhat[r * D + c] * tweight.get(c) : 0);
      }
      const auto t = rotate(tn, token(r), false);
      for (int64_t c = 0; c < D; ++c) {
        want_t[r * D + c] = t[c];
        t_scale = std::max(t_scale, std::abs(t[c]));
      }
    }
    expect_close(!with_tx ? "qk jvp without tx" : with_tw ? "qk jvp" : "qk jvp without tweight", config, tout, want_t,
                 2 * rounding(dtype) + 1e-5, t_scale);
  }
}

// The squared loss's tail (loss_b = the sample's sum, no weights): each sample's chunk sums added,
// the batch mean of a batch that is not a multiple of the block, and the per-sample values.
void loss_tail(int64_t batch, int64_t chunks_per_sample, bool mean) {
  const std::string config = "B=" + std::to_string(batch) + " chunks=" + std::to_string(chunks_per_sample) +
                             " mean=" + std::to_string(mean);
  std::vector<float> sums(batch * chunks_per_sample), loss(mean ? 1 : batch, NAN), saved(2 * batch, NAN);
  for (auto& s : sums) s = static_cast<float>(std::abs(normal()) * 100);
  fastgen::LossTailArgs tail{fastgen::LossTail::kSquared, {1.0, 0.0, 0.0, 0.0}, 1, mean ? 1.0 / batch : 1.0};
  const fastgen::cuda::SampleLossTailArgs args{tail, sums.data(), chunks_per_sample, nullptr, nullptr, nullptr,
                                               loss.data(), saved.data(), batch, mean};
  if (fastgen::cuda::launch_sample_loss_tail(args, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL loss tail launch refused %s\n", config.c_str());
    return;
  }
  std::vector<double> per_sample(batch, 0);
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    double chunk_total = 0;  // the kernel adds a sample's chunks in fp64 and rounds the sum to fp32
    for (int64_t k = 0; k < chunks_per_sample; ++k) chunk_total += sums[b * chunks_per_sample + k];
    const float sample = static_cast<float>(chunk_total);
    per_sample[b] = sample;
    total += sample;
  }
  if (mean) {
    expect_close("loss tail mean", config, loss, {total / batch}, 1e-7, 0.0);
  } else {
    expect_close("loss tail values", config, loss, per_sample, 1e-7, 0.0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::strcmp(argv[1], "full") == 0;
  const std::pair<DType, DType> pairs[] = {{DType::kFloat32, DType::kFloat32},
                                           {DType::kBFloat16, DType::kBFloat16},
                                           {DType::kFloat16, DType::kFloat16},
                                           {DType::kFloat32, DType::kBFloat16},
                                           {DType::kFloat32, DType::kFloat16}};
  // row widths: one column, odd, vector multiples, DiT's 1152; the widest rows in "full"
  const std::vector<int64_t> dims = full ? std::vector<int64_t>{1, 3, 8, 77, 520, 1152, 4608, 8191, 8192}
                                         : std::vector<int64_t>{1, 3, 77, 1152};
  for (auto [dtype, other] : pairs)
    for (int64_t dim : dims)
      for (int offset : {0, 1})
        // about eight chunks a 132-SM GPU's SM (launch.h) and two in all: rows walked one after another
        for (int64_t target : {int64_t{1056}, int64_t{2}}) {
          for (int tokenwise = 0; tokenwise < 4; ++tokenwise) {
            const bool shift_tok = tokenwise & 1, scale_tok = tokenwise & 2;
            modulated_norm({dtype, other, 2, 3, dim, shift_tok, scale_tok, true, true, false, offset, target});
            if (tokenwise == 0 || tokenwise == 3) {
              modulated_norm({dtype, other, 1, 7, dim, shift_tok, scale_tok, true, false, true, offset, target});
              modulated_norm({dtype, other, 2, 3, dim, shift_tok, scale_tok, false, false, false, offset, target});
            }
          }
          for (bool gate_tok : {false, true}) {
            gated_residual(dtype, other, 2, 3, dim, gate_tok, false, offset, target);
            gated_residual(dtype, other, 1, 7, dim, gate_tok, true, offset, target);
          }
        }
  // head dims: odd (no rotary), DiT-XL's 72, two pairs a lane, the widest
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (int64_t dim : {int64_t{7}, int64_t{72}, int64_t{130}, int64_t{256}})
      for (int rope = 0; rope < 3; ++rope) {
        if (rope != 0 && dim % 2) continue;
        for (bool weighted : {true, false})
          for (int64_t target : {int64_t{1056}, int64_t{2}}) qk_norm_rope(dtype, 2, 3, 3, dim, weighted, rope, target);
      }
  for (int64_t batch : {1, 300, 4097})
    for (bool mean : {true, false}) loss_tail(batch, 3, mean);
  std::printf("%lld launches emulated, %d failures\n", emu::launches, failures);
  return failures != 0;
}
