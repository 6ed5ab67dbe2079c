// The per-sample tails of the fused losses: from one sample's sums (sample_chunks.h) and its
// per-sample inputs to its loss and to the per-sample factors its backward needs. One formula for
// the CPU (cpu/sample_loss_tail.cpp) and the CUDA (cuda/sample_loss_tail.cu) finish steps; the
// Triton kernel (triton_ops/sample_loss_tail.py) and the reference
// (fastgen_kernels/ops/_sample_loss.py) mirror it. Plain C++: nvcc and the host compiler both
// include it.
//
// Each tail runs after its loss's reduction as ONE launch over the batch that also reduces the
// batch ("mean": sum_b loss_b / B, added in a fixed order), so a loss's forward costs the reduction
// and this launch whatever the tail's formula, instead of a dozen (B,)-sized torch ops. `red` is
// the derivative of the reduction with respect to loss_b (1 / B for "mean", 1 for "none"); every
// saved factor includes it, so a backward multiplies it by the upstream gradient alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGEN_HOST_DEVICE __host__ __device__
#else
#define FASTGEN_HOST_DEVICE
#endif

namespace fastgen {

// The tails, with the sums they read (S...) and what they save per sample (saved[...]); D is the
// number of elements per sample, w the optional per-sample weight (1 when absent).
enum class LossTail : int64_t {
  // Squared residual S (denoising, consistency, MeanFlow); params (scale, huber h, power p,
  // offset c): m = S / (sqrt(S + h^2) + h) (pseudo-Huber; m = S for h = 0), A = sg((m + c)^-p)
  // (MeanFlow's adaptive weight; A = 1 for p = 0), loss_b = w scale A m.
  // saved: (2 red w scale A dm/dS, red scale A m): the scale of the residual's VJP, and d/dw.
  kSquared = 0,
  // VSD (S1 = sum |x_g - T|, S2 = sum (Fk - T)^2); params (eps): c = w / (S1 / D + eps),
  // loss_b = 0.5 c^2 S2 / D. saved: (red c / D).
  kVsd = 1,
  // Softplus sum S (GAN); no params: loss_b = S / D. saved: (red / D).
  kSoftplus = 2,
  // sCM (sum g^2, sum d g, sum d^2) with t and logvar u; params (sigma_data, warmup, c):
  // n = 1 / (sqrt(sum g^2 / D) + c), S = max(sum d^2 - 2 n sum d g + n^2 sum g^2, 0),
  // k = e^-u / (D max(sigma_data tan t, 1e-6)) (0 where cos t <= 0: t at pi/2), loss_b = S k + u.
  // saved: (2 red k, red (1 - S k), n p) with p the tangent's coefficients (scm_coefficients).
  kScm = 3,
};

constexpr int64_t kLossTails = 4;
constexpr int kTailParams = 4;

// The number of sums per sample a tail reads, and of values per sample it saves.
FASTGEN_HOST_DEVICE constexpr int tail_sums(LossTail kind) {
  return kind == LossTail::kVsd ? 2 : kind == LossTail::kScm ? 3 : 1;
}
FASTGEN_HOST_DEVICE constexpr int tail_saved(LossTail kind) {
  return kind == LossTail::kSquared ? 2 : kind == LossTail::kScm ? 6 : 1;
}

struct LossTailArgs {
  LossTail kind;
  double params[kTailParams];
  int64_t numel;  // D
  double red;     // 1 / B for "mean", 1 for "none"
};

// The tangent g = p . (F_minus, dxt_dt, jvp, x_t) of sCM at TrigFlow time t: p = (-cos^2 t sigma_data,
// cos^2 t, -warmup sigma_data, -warmup cos t sin t).
template <typename T>
FASTGEN_HOST_DEVICE inline void scm_coefficients(T t, T sigma_data, T warmup, T (&p)[4]) {
  const T cos_t = cos(t), sin_t = sin(t);
  p[0] = -cos_t * cos_t * sigma_data;
  p[1] = cos_t * cos_t;
  p[2] = -warmup * sigma_data;
  p[3] = -warmup * cos_t * sin_t;
}

// loss_b of one sample; writes its kTailSaved[kind] saved values. weight, t, logvar: the sample's
// per-sample inputs (1, 0, 0 when the loss has none).
template <typename T>
FASTGEN_HOST_DEVICE inline T loss_tail(const LossTailArgs& args, const T* sums, T weight, T t, T logvar,
                                       T* saved) {
  const T D = static_cast<T>(args.numel), red = static_cast<T>(args.red);
  const T p0 = static_cast<T>(args.params[0]), p1 = static_cast<T>(args.params[1]);
  const T p2 = static_cast<T>(args.params[2]), p3 = static_cast<T>(args.params[3]);
  switch (args.kind) {
    case LossTail::kSquared: {
      const T S = sums[0];
      T m = S, dm = 1;
      if (p1 > 0) {  // pseudo-Huber, written without the cancellation of sqrt(S + h^2) - h near 0
        const T root = sqrt(S + p1 * p1);
        m = S / (root + p1);
        dm = 1 / (2 * root);
      }
      const T adaptive = p2 != 0 ? pow(m + p3, -p2) : T(1);
      saved[0] = 2 * red * weight * p0 * adaptive * dm;
      saved[1] = red * p0 * adaptive * m;
      return weight * p0 * adaptive * m;
    }
    case LossTail::kVsd: {
      const T c = 1 / (sums[0] / D + p0) * weight;
      saved[0] = red * c / D;
      return T(0.5) * c * c * sums[1] / D;
    }
    case LossTail::kSoftplus:
      saved[0] = red / D;
      return sums[0] / D;
    case LossTail::kScm: {
      const T n = 1 / (sqrt(sums[0] / D) + p2);
      // the clamps below keep a NaN (a diverged sample) a NaN, as torch's clamp_min does
      T S = sums[2] - 2 * sums[1] * n + sums[0] * n * n;
      S = S < 0 ? T(0) : S;
      T sigma = p0 * tan(t);
      sigma = sigma < T(1e-6) ? T(1e-6) : sigma;  // sCM's 1 / sigma: no zero denominators
      // t at pi/2, or past it once rounded (tan < 0): 1 / sigma -> 0; a NaN t stays NaN
      const T k = cos(t) <= T(0) ? T(0) : exp(-logvar) / (D * sigma);
      T p[4];
      scm_coefficients(t, p0, p1, p);
      saved[0] = 2 * red * k;
      saved[1] = red * (1 - S * k);
      for (int i = 0; i < 4; ++i) saved[2 + i] = n * p[i];
      return S * k + logvar;
    }
  }
  return T(0);
}

}  // namespace fastgen
