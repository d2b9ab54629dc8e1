// Which CUDA conv2d kernel family runs: chosen per shape, or forced (tests run every family on
// every configuration). Set through pyconv._C.set_cuda_conv_path.
#pragma once

#include <atomic>

namespace pyconv {

constexpr int kConvPathAuto = 0;
constexpr int kConvPathGemm = 1;
constexpr int kConvPathDirect = 2;

inline std::atomic<int>& conv_path_cuda_flag() {
  static std::atomic<int> flag{kConvPathAuto};
  return flag;
}
inline int conv_path_cuda() { return conv_path_cuda_flag().load(std::memory_order_relaxed); }

}  // namespace pyconv
