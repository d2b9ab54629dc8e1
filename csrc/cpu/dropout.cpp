// CPU dropout and feature (channel) dropout: checks, layout, threading. Inner loops live in
// cpu/kernels/dropout_{avx2,generic}.cpp.
#include "common/dropout.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "cpu/buffer_cache.h"
#include "cpu/simd.h"

namespace pyconv::cpu {
namespace {

int64_t seed_value(const char* op, const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu(), op, ": expected seed on the CPU for a CPU input, got ",
              seed.device());
  return seed.item<int64_t>();
}

constexpr int64_t kGrainBlocks = 2048;  // 64 Ki elements per task

void dropout_dense(const at::Tensor& src, at::Tensor& dst, const DropoutParams& d) {
  const int64_t n = dst.numel();
  const ScalarKind kind = scalar_kind(dst.scalar_type());
  const DropoutKernels& k = dropout_kernels();
  const void* s = src.const_data_ptr();
  void* o = dst.mutable_data_ptr();
  at::parallel_for(0, (n + 31) / 32, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    k.dropout_range(s, o, b0 * 32, std::min(b1 * 32, n), d, kind);
  });
}

at::Tensor dropout(const at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout", input, p, seed);
  at::Tensor out = empty_like_cached(input);
  if (input.numel() == 0) return out;
  const DropoutParams d = dropout_params_from(p, seed_value("dropout", seed));
  const at::Tensor src = dense_source(input, out);
  dropout_dense(src, out, d);
  return out;
}

void dropout_(at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout_", input, p, seed);
  if (input.numel() == 0) return;
  if (!input.is_non_overlapping_and_dense()) {
    input.copy_(dropout(input, p, seed));
    return;
  }
  const DropoutParams d = dropout_params_from(p, seed_value("dropout_", seed));
  dropout_dense(input, input, d);
}

// keep[q] for every (n, c) pair q = n * C + c: draw q of the stream.
std::vector<uint8_t> feature_keep(int64_t count, const DropoutParams& d) {
  std::vector<uint8_t> keep(static_cast<size_t>(count));
  uint32_t draws[32];
  for (int64_t q = 0; q < count; ++q) {
    if (q % 32 == 0) philox_block32(d.seed, d.offset, static_cast<uint64_t>(q / 32), draws);
    keep[q] = dropout_keep(draws[q % 32], d);
  }
  return keep;
}

void feature_dropout_into(const at::Tensor& src, at::Tensor& dst, const DropoutParams& d) {
  const int64_t N = dst.size(0), C = dst.size(1);
  const int64_t inner = N * C == 0 ? 0 : dst.numel() / (N * C);
  const std::vector<uint8_t> keep = feature_keep(N * C, d);
  const ScalarKind kind = scalar_kind(dst.scalar_type());
  const DropoutKernels& k = dropout_kernels();
  const void* s = src.const_data_ptr();
  void* o = dst.mutable_data_ptr();
  const uint8_t* kp = keep.data();
  if (feature_layout(dst) == FeatureLayout::kPlanes) {
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(inner, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t q0, int64_t q1) {
      k.scale_planes(s, o, q0, q1, inner, kp, d, kind);
    });
  } else {
    const int64_t rows = N * inner;
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      k.scale_rows(s, o, r0, r1, C, inner, kp, d, kind);
    });
  }
}

at::Tensor feature_dropout(const at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout2d", input, p, seed);
  check_feature_input("dropout2d", input);
  at::Tensor out = empty_like_cached(input);
  if (input.numel() == 0) return out;
  const DropoutParams d = dropout_params_from(p, seed_value("dropout2d", seed));
  if (feature_layout(out) == FeatureLayout::kOther) {
    at::Tensor tmp = input.contiguous();
    at::Tensor res = at::empty_like(tmp);
    feature_dropout_into(tmp, res, d);
    out.copy_(res);
    return out;
  }
  const at::Tensor src = dense_source(input, out);
  feature_dropout_into(src, out, d);
  return out;
}

void feature_dropout_(at::Tensor& input, double p, const at::Tensor& seed) {
  check_dropout_args("dropout2d_", input, p, seed);
  check_feature_input("dropout2d_", input);
  if (input.numel() == 0) return;
  if (!input.is_non_overlapping_and_dense() || feature_layout(input) == FeatureLayout::kOther) {
    input.copy_(feature_dropout(input, p, seed));
    return;
  }
  const DropoutParams d = dropout_params_from(p, seed_value("dropout2d_", seed));
  feature_dropout_into(input, input, d);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CPU, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_", &dropout_);
  m.impl("dropout2d", &feature_dropout);
  m.impl("dropout2d_", &feature_dropout_);
}

}  // namespace pyconv::cpu
