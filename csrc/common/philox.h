// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// One definition for host and device code, so that a (seed, offset, index) gives the same bits on
// every backend. Dependency free: included by kernels that do not see any torch header.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYCONV_HD __host__ __device__ __forceinline__
#else
#define PYCONV_HD inline
#endif

namespace pyconv {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

PYCONV_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Ten rounds on counter (c0, c1, c2, c3) with key (k0, k1).
PYCONV_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
    philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The stream convention used by every pyconv op: key = seed, counter = (group, offset). Element i
// of the stream is word (i / 8) % 4 of group (i / 32) * 8 + i % 8: each block of 32 consecutive
// elements is 8 groups x 4 words, laid out word-major, so that SIMD and GPU code get 8 consecutive
// elements from one word of 8 groups without a transpose.
PYCONV_HD Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

PYCONV_HD uint64_t philox_group_of(uint64_t i) { return (i >> 5) * 8 + (i & 7); }
PYCONV_HD int philox_word_of(uint64_t i) { return static_cast<int>((i >> 3) & 3); }

// The 32 draws of block b (elements 32 b ... 32 b + 31), in element order.
PYCONV_HD void philox_block32(uint64_t seed, uint64_t offset, uint64_t block, uint32_t out[32]) {
  for (int s = 0; s < 8; ++s) {
    const Philox4 r = philox_group(seed, offset, block * 8 + s);
    for (int j = 0; j < 4; ++j) out[8 * j + s] = r.x[j];
  }
}

// Draw i of the stream keyed by (seed, offset).
PYCONV_HD uint32_t philox_draw(uint64_t seed, uint64_t offset, uint64_t i) {
  return philox_group(seed, offset, philox_group_of(i)).x[philox_word_of(i)];
}

// What dropout needs to decide and scale one element: an element whose 32-bit draw u satisfies
// u < threshold is dropped, so P(drop) = threshold / 2^32 (p rounded to a multiple of 2^-32).
struct DropoutParams {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint32_t threshold = 0;
  bool drop_all = false;  // p == 1
  float scale = 1.0f;     // 1 / (1 - p), for float32, float16 and bfloat16
  double scale_d = 1.0;   // 1 / (1 - p), for float64
};

inline DropoutParams make_dropout_params(double p, uint64_t seed, uint64_t offset) {
  DropoutParams d;
  d.seed = seed;
  d.offset = offset;
  if (p >= 1.0) {
    d.drop_all = true;
    d.scale = 0.0f;
    d.scale_d = 0.0;
    return d;
  }
  const double t = p * 4294967296.0;
  d.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  d.scale_d = 1.0 / (1.0 - p);
  d.scale = static_cast<float>(d.scale_d);
  return d;
}

PYCONV_HD bool dropout_keep(uint32_t draw, const DropoutParams& d) {
  return !d.drop_all && draw >= d.threshold;
}

}  // namespace pyconv
