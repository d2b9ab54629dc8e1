#include "cpu/simd.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace pyconv::cpu {
namespace {

enum Path : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest path the CPU has, or PYCONV_SIMD's (generic, avx2) where it names a narrower one.
int initial_path() {
  const int best = cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kGeneric;
  const char* env = std::getenv("PYCONV_SIMD");
  if (env != nullptr && std::string(env) == "generic") return kGeneric;
  if (env != nullptr && std::string(env) == "avx2") return std::min<int>(best, kAvx2);
  return best;
}

std::atomic<int>& current() {
  static std::atomic<int> path{initial_path()};
  return path;
}

}  // namespace

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool simd_is_avx2() { return current().load() >= kAvx2; }

bool simd_is_avx512() { return current().load() == kAvx512; }

std::string simd_path() {
  const int p = current().load();
  return p == kAvx512 ? "avx512" : p == kAvx2 ? "avx2" : "generic";
}

void set_simd_path(const std::string& name) {
  if (name == "generic") {
    current() = kGeneric;
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "set_simd: this CPU lacks AVX2/FMA/F16C");
    current() = kAvx2;
  } else if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "set_simd: this CPU lacks AVX-512 (F, VL, DQ, BW)");
    current() = kAvx512;
  } else {
    TORCH_CHECK(false, "set_simd: expected 'avx512', 'avx2' or 'generic', got '", name, "'");
  }
}

const DropoutKernels& dropout_kernels() {
  return current().load() >= kAvx2 ? dropout_kernels_avx2() : dropout_kernels_generic();
}

const PoolKernels& pool_kernels() {
  return current().load() >= kAvx2 ? pool_kernels_avx2() : pool_kernels_generic();
}

}  // namespace pyconv::cpu
