// The CPU kernels once more, compiled for AVX2 + FMA + F16C into namespace fastgen::cpu::avx2
// (why and how: cpu/isa.h); cpu/isa_dispatch.cpp runs them only on a CPU that has them.
#if defined(__x86_64__) && defined(__GNUC__)
#include "cpu/isa_copy.h"

#pragma GCC target("avx2,fma,f16c")
#define FASTGEN_CPU_ISA avx2
#include "cpu/isa_kernels.inc"
#endif
