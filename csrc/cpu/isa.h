// Instruction sets of the CPU loss kernels. The per-sample loss kernels (vsd_loss, squared_residual,
// scm_loss, gan_loss and the headers they share) are compiled twice: in their own files for the
// baseline of the target (SSE2 on x86-64), and, on x86-64, once more by csrc/cpu/avx2_losses.cpp
// for AVX2 + FMA + F16C (x86-64-v3: twice the vector width, and exp/log1p and the half-precision
// conversions 3x faster). Each copy lives in its own namespace, fastgen::cpu::FASTGEN_CPU_ISA, so
// no function exists in two instruction sets under one name; the entry points declared in ops.h
// (csrc/cpu/loss_dispatch.cpp) run the copy the CPU supports.
#pragma once

#ifndef FASTGEN_CPU_ISA
#define FASTGEN_CPU_ISA baseline
#endif
