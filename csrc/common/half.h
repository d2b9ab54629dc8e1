// Portable scalar conversions between float and the 16-bit float formats (round to nearest even),
// for kernels that do not include torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pyconv {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t b = float_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x0040u);  // NaN
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf, NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  // subnormal half: value = man * 2^-24
  const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

inline uint16_t float_to_half(float f) {
  const uint32_t b = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (a < 0x38800000u) {  // result is subnormal or zero: round man * 2^-24 to an integer
    const float v = bits_to_float(a) * 16777216.0f;  // exact: scales by 2^24
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(v)));  // RNE
  }
  // normal: rebias exponent, round mantissa to 10 bits (RNE)
  uint32_t m = a - 0x38000000u;  // exponent 127 -> 15
  m += 0xFFFu + ((m >> 13) & 1u);
  return static_cast<uint16_t>(sign | static_cast<uint16_t>(m >> 13));
}

}  // namespace pyconv
