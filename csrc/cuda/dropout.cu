// CUDA dropout and feature (channel) dropout. The Philox stream and the keep rule are those of
// common/philox.h, shared with the CPU kernels, so a seed gives the same mask on both.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/dropout.h"
#include "common/philox.h"
#include "cuda/common.cuh"

namespace pyconv::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;  // elements per thread: one block of eight Philox groups

__device__ __forceinline__ void resolve_seed(DropoutParams& d, const int64_t* seed_ptr) {
  if (seed_ptr != nullptr) d.seed = static_cast<uint64_t>(*seed_ptr);
}

template <typename T>
__device__ __forceinline__ T apply(T x, bool keep, const DropoutParams& d) {
  using Acc = typename AccType<T>::type;
  const Acc scale = sizeof(Acc) == 8 ? static_cast<Acc>(d.scale_d) : static_cast<Acc>(d.scale);
  return keep ? static_cast<T>(static_cast<Acc>(x) * scale) : static_cast<T>(Acc(0));
}

// Threads per block: the staging buffer below stays under 48 KB for every type.
template <typename T>
constexpr int threads_for() {
  return sizeof(T) == 8 ? 128 : 256;
}

// Each thread: one block of 32 consecutive elements (eight Philox groups, common/philox.h). When
// src and dst are 16-byte aligned, a warp moves its 32 blocks as 16-byte vectors with consecutive
// lanes on consecutive vectors (coalesced), through shared memory where each lane then takes its
// own block (rows padded by one vector: no bank conflicts). src may equal dst (in place): a warp
// loads all of its elements before it stores any, and warps share no element.
template <typename T, bool kVector>
__global__ void __launch_bounds__(256)
    dropout_kernel(const T* src, T* dst, int64_t n, DropoutParams d, const int64_t* seed_ptr) {
  constexpr int kT = threads_for<T>();
  using V = Vec16<T>;
  constexpr int kVB = kChunk / V::kSize;  // vectors per block of 32 elements
  resolve_seed(d, seed_ptr);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kT + threadIdx.x;
  const int64_t base = block * kChunk;
  const int64_t warp_base = (static_cast<int64_t>(blockIdx.x) * kT + warp * 32) * kChunk;
  if (warp_base >= n) return;
  if (kVector && warp_base + 32 * kChunk <= n) {
    __shared__ V stage[kT / 32][32 * (kVB + 1)];
    V* buf = stage[warp];
    const V* in = reinterpret_cast<const V*>(src + warp_base);
#pragma unroll
    for (int k = 0; k < kVB; ++k) {
      const int vi = k * 32 + lane;
      buf[(vi / kVB) * (kVB + 1) + vi % kVB] = in[vi];
    }
    __syncwarp();
    V v[kVB];
#pragma unroll
    for (int k = 0; k < kVB; ++k) v[k] = buf[lane * (kVB + 1) + k];
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const Philox4 r = philox_group(d.seed, d.offset, static_cast<uint64_t>(block) * 8 + s);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = 8 * j + s;  // element of the block that word j of group s decides
        T& x = v[e / V::kSize].v[e % V::kSize];
        x = apply(x, dropout_keep(r.x[j], d), d);
      }
    }
#pragma unroll
    for (int k = 0; k < kVB; ++k) buf[lane * (kVB + 1) + k] = v[k];
    __syncwarp();
    V* out = reinterpret_cast<V*>(dst + warp_base);
#pragma unroll
    for (int k = 0; k < kVB; ++k) {
      const int vi = k * 32 + lane;
      out[vi] = buf[(vi / kVB) * (kVB + 1) + vi % kVB];
    }
  } else if (base < n) {
    uint32_t draws[kChunk];
    philox_block32(d.seed, d.offset, static_cast<uint64_t>(block), draws);
    for (int e = 0; e < kChunk && base + e < n; ++e) {
      dst[base + e] = apply(src[base + e], dropout_keep(draws[e], d), d);
    }
  }
}

// keep[q] = draw q of the stream survives, for the N * C (sample, channel) pairs.
__global__ void feature_keep_kernel(uint8_t* keep, int64_t count, DropoutParams d,
                                    const int64_t* seed_ptr) {
  resolve_seed(d, seed_ptr);
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= count) return;
  keep[q] = dropout_keep(philox_draw(d.seed, d.offset, static_cast<uint64_t>(q)), d) ? 1 : 0;
}

// Feature dropout: element i belongs to pair q. Planes (NCHW-dense): q = i / inner. Rows
// (channels innermost): q = (i / (C * inner)) * C + i % C.
template <typename T, bool kRows>
__global__ void __launch_bounds__(kThreads)
    feature_apply_kernel(const T* src, T* dst, int64_t n, int64_t C, int64_t inner,
                         const uint8_t* __restrict__ keep, DropoutParams d) {
  using V = Vec16<T>;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V::kSize;
  if (base >= n) return;
  // position of `base`, advanced element by element below
  int64_t a, b;  // planes: (q, offset in plane); rows: (sample, channel)
  if (kRows) {
    a = base / (C * inner);
    b = base % C;
  } else {
    a = base / inner;
    b = base % inner;
  }
  auto step = [&](int64_t i) {
    if (kRows) {
      if (++b == C) {
        b = 0;
        a = (i + 1) / (C * inner);
      }
    } else if (++b == inner) {
      b = 0;
      ++a;
    }
  };
  auto pair = [&]() { return kRows ? a * C + b : a; };
  if (base + V::kSize <= n && aligned16(src) && aligned16(dst)) {
    V v = *reinterpret_cast<const V*>(src + base);
#pragma unroll
    for (int e = 0; e < V::kSize; ++e) {
      v.v[e] = apply(v.v[e], keep[pair()] != 0, d);
      step(base + e);
    }
    *reinterpret_cast<V*>(dst + base) = v;
  } else {
    for (int64_t i = base; i < n && i < base + V::kSize; ++i) {
      dst[i] = apply(src[i], keep[pair()] != 0, d);
      step(i);
    }
  }
}

struct SeedArg {
  uint64_t value = 0;
  const int64_t* ptr = nullptr;
};

SeedArg seed_arg(const char* op, const at::Tensor& seed, const at::Tensor& input) {
  SeedArg s;
  if (seed.is_cuda()) {
    TORCH_CHECK(seed.device() == input.device(), op, ": expected seed on ", input.device(),
                " or the CPU, got ", seed.device());
    s.ptr = seed.const_data_ptr<int64_t>();
  } else {
    s.value = static_cast<uint64_t>(seed.item<int64_t>());
  }
  return s;
}

void dropout_dense(const at::Tensor& src, at::Tensor& dst, double p, const SeedArg& seed) {
  const int64_t n = dst.numel();
  DropoutParams d = dropout_params_from(p, static_cast<int64_t>(seed.value));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = aligned16(src.const_data_ptr()) && aligned16(dst.const_data_ptr());
  dispatch_float_types(dst.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src.const_data_ptr());
    T* o = static_cast<T*>(dst.mutable_data_ptr());
    constexpr int kT = threads_for<T>();
    const int64_t blocks = ceil_div(ceil_div(n, kChunk), kT);
    if (vec) {
      dropout_kernel<T, true><<<blocks, kT, 0, stream>>>(s, o, n, d, seed.ptr);
    } else {
      dropout_kernel<T, false><<<blocks, kT, 0, stream>>>(s, o, n, d, seed.ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dropout(const at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout", input, p, seed);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const SeedArg s = seed_arg("dropout", seed, input);
  const at::Tensor src = dense_source(input, out);
  dropout_dense(src, out, p, s);
  return out;
}

void dropout_(at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout_", input, p, seed);
  c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return;
  if (!input.is_non_overlapping_and_dense()) {
    input.copy_(dropout(input, p, seed));
    return;
  }
  dropout_dense(input, input, p, seed_arg("dropout_", seed, input));
}

void feature_dropout_into(const at::Tensor& src, at::Tensor& dst, double p, const SeedArg& seed,
                          bool rows) {
  const int64_t N = dst.size(0), C = dst.size(1), n = dst.numel();
  const int64_t inner = n / (N * C);
  DropoutParams d = dropout_params_from(p, static_cast<int64_t>(seed.value));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor keep = at::empty({N * C}, dst.options().dtype(at::kByte));
  feature_keep_kernel<<<ceil_div(N * C, kThreads), kThreads, 0, stream>>>(
      keep.mutable_data_ptr<uint8_t>(), N * C, d, seed.ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_float_types(dst.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src.const_data_ptr());
    T* o = static_cast<T*>(dst.mutable_data_ptr());
    const int64_t blocks = ceil_div(ceil_div(n, Vec16<T>::kSize), kThreads);
    const uint8_t* k = keep.const_data_ptr<uint8_t>();
    if (rows) {
      feature_apply_kernel<T, true><<<blocks, kThreads, 0, stream>>>(s, o, n, C, inner, k, d);
    } else {
      feature_apply_kernel<T, false><<<blocks, kThreads, 0, stream>>>(s, o, n, C, inner, k, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor feature_dropout(const at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout2d", input, p, seed);
  check_feature_input("dropout2d", input);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const SeedArg s = seed_arg("dropout2d", seed, input);
  const FeatureLayout layout = feature_layout(out);
  if (layout == FeatureLayout::kOther) {
    at::Tensor tmp = input.contiguous();
    at::Tensor res = at::empty_like(tmp);
    feature_dropout_into(tmp, res, p, s, /*rows=*/false);
    out.copy_(res);
    return out;
  }
  const at::Tensor src = dense_source(input, out);
  feature_dropout_into(src, out, p, s, layout == FeatureLayout::kRows);
  return out;
}

void feature_dropout_(at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout2d_", input, p, seed);
  check_feature_input("dropout2d_", input);
  c10::cuda::CUDAGuard guard(input.device());
  if (input.numel() == 0) return;
  const FeatureLayout layout = feature_layout(input);
  if (!input.is_non_overlapping_and_dense() || layout == FeatureLayout::kOther) {
    input.copy_(feature_dropout(input, p, seed));
    return;
  }
  feature_dropout_into(input, input, p, seed_arg("dropout2d_", seed, input),
                       layout == FeatureLayout::kRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CUDA, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_", &dropout_);
  m.impl("dropout2d", &feature_dropout);
  m.impl("dropout2d_", &feature_dropout_);
}

}  // namespace pyconv::cuda
