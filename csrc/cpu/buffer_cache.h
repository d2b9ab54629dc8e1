// A cache of large CPU buffers for op outputs. torch's CPU allocator hands blocks of more than a
// few MiB back to the operating system on free, so each fresh output pays a page fault per 4 KiB
// touched (here that costs more than the dropout kernel itself). Buffers of at least kMinBytes come
// from this cache instead and return to it when their tensor dies, up to a byte limit
// (PYCONV_CPU_CACHE_MB, default 1024; 0 turns the cache off); pyconv.empty_cache() frees them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace pyconv::cpu {

// 128 KiB: the C library's own threshold for mapping a block. Below 1 MiB too, its frees could
// hand an output's pages back (a heap trim), per process or not: the NCHW 32 -> 32 3x3 forward,
// two such buffers (channels_last output and NCHW copy), ran 0.31 or 0.93 ms by the process,
// 0.18 ms from the cache (measured).
constexpr size_t kMinCachedBytes = size_t{128} << 10;

// Same sizes, strides, dtype and device as at::empty_like(like).
at::Tensor empty_like_cached(const at::Tensor& like);

// Same as at::empty(sizes, options.memory_format(format)) on the CPU.
at::Tensor empty_cached(c10::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format);

struct BufferCacheStats {
  int64_t cached_bytes;
  int64_t cached_blocks;
  int64_t limit_bytes;
  int64_t hits;
  int64_t misses;
};

BufferCacheStats buffer_cache_stats();
void buffer_cache_clear();
void buffer_cache_set_limit(int64_t bytes);

// Testing aid: every output then comes from the cache, filled with 0xFF bytes (NaN), so that an
// element a kernel forgets to write shows.
void buffer_cache_set_poison(bool on);
bool buffer_cache_poison();

}  // namespace pyconv::cpu
