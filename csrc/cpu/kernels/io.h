// Scalar loads and stores of the four floating types as float (double for float64), for the
// portable kernels.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace pyconv::cpu {

struct HalfTag {};
struct BF16Tag {};

template <typename Tag>
struct Io;
template <>
struct Io<float> {
  using T = float;
  using Acc = float;
  static float load(const T& v) { return v; }
  static T store(float v) { return v; }
};
template <>
struct Io<double> {
  using T = double;
  using Acc = double;
  static double load(const T& v) { return v; }
  static T store(double v) { return v; }
};
template <>
struct Io<HalfTag> {
  using T = uint16_t;
  using Acc = float;
  static float load(const T& v) { return half_to_float(v); }
  static T store(float v) { return float_to_half(v); }
};
template <>
struct Io<BF16Tag> {
  using T = uint16_t;
  using Acc = float;
  static float load(const T& v) { return bf16_to_float(v); }
  static T store(float v) { return float_to_bf16(v); }
};

}  // namespace pyconv::cpu
