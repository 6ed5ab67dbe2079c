// Included by each extra instruction-set copy of the CPU kernels (cpu/isa.h), first thing:
// every library header those kernels use, so that their inline functions and templates are
// compiled for the baseline before the copy's `#pragma GCC target` applies to what follows.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "ops.h"
#include "sample_chunks.h"
