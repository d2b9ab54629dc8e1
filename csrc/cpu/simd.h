// Which instruction set the CPU kernels use: chosen once from CPUID (or PYCONV_SIMD=generic),
// switchable at run time so that tests can hold every path against the others.
#pragma once

#include <string>

#include "cpu/kernels/dropout_kernels.h"
#include "cpu/kernels/pool_kernels.h"

namespace pyconv::cpu {

bool cpu_has_avx2();  // AVX2, FMA and F16C together
std::string simd_path();
void set_simd_path(const std::string& name);  // "avx2" (where supported) or "generic"
const DropoutKernels& dropout_kernels();
const PoolKernels& pool_kernels();

}  // namespace pyconv::cpu
