// The CPU kernels once more, compiled for AVX-512 (F, BW, DQ, VL) with FMA and F16C into
// namespace fastgen::cpu::avx512 (why and how: cpu/isa.h); cpu/isa_dispatch.cpp runs them only on
// a CPU that has them.
#if defined(__x86_64__) && defined(__GNUC__)
#include "cpu/isa_copy.h"

#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define FASTGEN_CPU_ISA avx512
#include "cpu/isa_kernels.inc"
#endif
