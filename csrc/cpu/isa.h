// Instruction sets of the CPU kernels. The per-sample loss kernels (vsd_loss, squared_residual,
// scm_loss, gan_loss and the headers they share), the tanh-GELU and the row kernels
// (modulated_norm, gated_residual, qk_norm_rope) are compiled in their own files for the baseline
// of the target (SSE2 on x86-64) and, on x86-64, twice more: by csrc/cpu/avx2_kernels.cpp for
// AVX2 + FMA + F16C (x86-64-v3) and by csrc/cpu/avx512_kernels.cpp for AVX-512 (x86-64-v4), as
// ATen dispatches its own CPU kernels: 2x and 4x the vector width, which the compute-bound
// softplus/sigmoid and the half-precision conversions turn into 2.5-4x. Each copy lives in its own
// namespace, fastgen::cpu::FASTGEN_CPU_ISA, so no function exists in two instruction sets under
// one name; the entry points declared in ops.h (csrc/cpu/isa_dispatch.cpp) run the widest copy
// the CPU supports.
#pragma once

#ifndef FASTGEN_CPU_ISA
#define FASTGEN_CPU_ISA baseline
#endif
