// The CPU loss kernels once more, compiled for AVX2 + FMA + F16C into namespace fastgen::cpu::avx2
// (why and how: cpu/isa.h). Every library header comes first, so that its inline functions and
// templates keep the baseline instruction set; only the kernel code after the pragma is AVX2
// code, and cpu/loss_dispatch.cpp runs it only on a CPU that has it.
#if defined(__x86_64__) && defined(__GNUC__)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/common.h"
#include "ops.h"
#include "sample_chunks.h"

#pragma GCC target("avx2,fma,f16c")
#define FASTGEN_CPU_ISA avx2

#include "cpu/gan_loss.cpp"
#include "cpu/scm_loss.cpp"
#include "cpu/squared_residual.cpp"
#include "cpu/vsd_loss.cpp"

#endif
