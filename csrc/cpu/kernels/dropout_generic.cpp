// Portable dropout loops: the reference for the SIMD versions and the path on any CPU.
#include <algorithm>

#include "cpu/kernels/dropout_kernels.h"
#include "cpu/kernels/io.h"

namespace pyconv::cpu {
namespace {

template <typename Tag>
void dropout_range_t(const void* src_v, void* dst_v, int64_t begin, int64_t end,
                     const DropoutParams& d) {
  using T = typename Io<Tag>::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  uint32_t draws[32];
  for (int64_t i = begin; i < end;) {
    const int64_t block = i / 32;
    philox_block32(d.seed, d.offset, static_cast<uint64_t>(block), draws);
    for (const int64_t stop = std::min<int64_t>(end, block * 32 + 32); i < stop; ++i) {
      const bool keep = dropout_keep(draws[i & 31], d);
      dst[i] = Io<Tag>::store(keep ? Io<Tag>::load(src[i]) * d.scale : 0.0f);
    }
  }
}

void dropout_range_double(const void* src_v, void* dst_v, int64_t begin, int64_t end,
                          const DropoutParams& d) {
  const double* src = static_cast<const double*>(src_v);
  double* dst = static_cast<double*>(dst_v);
  uint32_t draws[32];
  for (int64_t i = begin; i < end;) {
    const int64_t block = i / 32;
    philox_block32(d.seed, d.offset, static_cast<uint64_t>(block), draws);
    for (const int64_t stop = std::min<int64_t>(end, block * 32 + 32); i < stop; ++i) {
      dst[i] = dropout_keep(draws[i & 31], d) ? src[i] * d.scale_d : 0.0;
    }
  }
}

void dropout_range(const void* src, void* dst, int64_t begin, int64_t end, const DropoutParams& d,
                   ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat:
      return dropout_range_t<float>(src, dst, begin, end, d);
    case ScalarKind::kDouble:
      return dropout_range_double(src, dst, begin, end, d);
    case ScalarKind::kHalf:
      return dropout_range_t<HalfTag>(src, dst, begin, end, d);
    case ScalarKind::kBFloat16:
      return dropout_range_t<BF16Tag>(src, dst, begin, end, d);
  }
}

template <typename Tag>
void scale_planes_t(const void* src_v, void* dst_v, int64_t q0, int64_t q1, int64_t plane,
                    const uint8_t* keep, float scale) {
  using T = typename Io<Tag>::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  for (int64_t q = q0; q < q1; ++q) {
    const T* x = src + q * plane;
    T* y = dst + q * plane;
    if (keep[q]) {
      for (int64_t i = 0; i < plane; ++i) y[i] = Io<Tag>::store(Io<Tag>::load(x[i]) * scale);
    } else {
      for (int64_t i = 0; i < plane; ++i) y[i] = Io<Tag>::store(0.0f);
    }
  }
}

void scale_planes(const void* src, void* dst, int64_t q0, int64_t q1, int64_t plane,
                  const uint8_t* keep, const DropoutParams& d, ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat:
      return scale_planes_t<float>(src, dst, q0, q1, plane, keep, d.scale);
    case ScalarKind::kHalf:
      return scale_planes_t<HalfTag>(src, dst, q0, q1, plane, keep, d.scale);
    case ScalarKind::kBFloat16:
      return scale_planes_t<BF16Tag>(src, dst, q0, q1, plane, keep, d.scale);
    case ScalarKind::kDouble: {
      const double* x = static_cast<const double*>(src);
      double* y = static_cast<double*>(dst);
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t i = q * plane; i < (q + 1) * plane; ++i)
          y[i] = keep[q] ? x[i] * d.scale_d : 0.0;
      }
      return;
    }
  }
}

template <typename Tag>
void scale_rows_t(const void* src_v, void* dst_v, int64_t r0, int64_t r1, int64_t channels,
                  int64_t rows_per_batch, const uint8_t* keep, float scale) {
  using T = typename Io<Tag>::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* k = keep + (r / rows_per_batch) * channels;
    const T* x = src + r * channels;
    T* y = dst + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      y[c] = Io<Tag>::store(k[c] ? Io<Tag>::load(x[c]) * scale : 0.0f);
    }
  }
}

void scale_rows(const void* src, void* dst, int64_t r0, int64_t r1, int64_t channels,
                int64_t rows_per_batch, const uint8_t* keep, const DropoutParams& d,
                ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat:
      return scale_rows_t<float>(src, dst, r0, r1, channels, rows_per_batch, keep, d.scale);
    case ScalarKind::kHalf:
      return scale_rows_t<HalfTag>(src, dst, r0, r1, channels, rows_per_batch, keep, d.scale);
    case ScalarKind::kBFloat16:
      return scale_rows_t<BF16Tag>(src, dst, r0, r1, channels, rows_per_batch, keep, d.scale);
    case ScalarKind::kDouble: {
      const double* x = static_cast<const double*>(src);
      double* y = static_cast<double*>(dst);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* k = keep + (r / rows_per_batch) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t i = r * channels + c;
          y[i] = k[c] ? x[i] * d.scale_d : 0.0;
        }
      }
      return;
    }
  }
}

}  // namespace

const DropoutKernels& dropout_kernels_generic() {
  static const DropoutKernels k{"generic", &dropout_range, &scale_planes, &scale_rows};
  return k;
}

}  // namespace pyconv::cpu
