#include "cpu/buffer_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace pyconv::cpu {
namespace {

constexpr size_t kPage = 4096;

class BufferCache {
 public:
  BufferCache() {
    const char* env = std::getenv("PYCONV_CPU_CACHE_MB");
    limit_ = env != nullptr ? static_cast<size_t>(std::strtoll(env, nullptr, 10)) << 20
                            : size_t{1024} << 20;
  }

  // A block of at least `bytes`; `*size` gets its real size.
  void* acquire(size_t bytes, size_t* size) {
    bytes = (bytes + kPage - 1) / kPage * kPage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        *size = it->first;
        void* p = it->second;
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "pyconv: out of memory allocating ", bytes, " bytes");
    *size = bytes;
    return p;
  }

  void release(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + size <= limit_) {
        free_.emplace(size, p);
        cached_ += size;
        return;
      }
    }
    munmap(p, size);
  }

  void clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [size, p] : blocks) munmap(p, size);
  }

  void set_limit(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
    }
    clear();
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(limit_), hits_, misses_};
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_ > 0;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

BufferCache& cache() {
  static BufferCache* c = new BufferCache();  // never destroyed: tensors may outlive exit hooks
  return *c;
}

}  // namespace

namespace {

std::atomic<bool> g_poison{false};

// A CPU tensor with the sizes and strides of `meta`, its storage from the cache.
at::Tensor from_cache(const at::Tensor& meta, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(meta.numel()) * meta.element_size();
  size_t size = 0;
  void* p = cache().acquire(std::max<size_t>(bytes, 1), &size);
  if (g_poison.load()) std::memset(p, 0xFF, size);  // NaN in every floating type
  return at::from_blob(
      p, meta.sizes(), meta.strides(), [size](void* q) { cache().release(q, size); }, options);
}

bool use_cache(int64_t numel, int64_t element_size) {
  if (g_poison.load()) return true;
  return static_cast<size_t>(numel * element_size) >= kMinCachedBytes && cache().enabled();
}

}  // namespace

at::Tensor empty_like_cached(const at::Tensor& like) {
  if (!like.device().is_cpu() || !use_cache(like.numel(), like.element_size())) {
    return at::empty_like(like);
  }
  // The layout at::empty_like would choose, without allocating.
  return from_cache(at::empty_like(like, like.options().device(at::kMeta)), like.options());
}

at::Tensor empty_cached(c10::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format) {
  const at::Tensor meta = at::empty(sizes, options.device(at::kMeta).memory_format(format));
  if (!options.device().is_cpu() || !use_cache(meta.numel(), meta.element_size())) {
    return at::empty(sizes, options.memory_format(format));
  }
  return from_cache(meta, options.memory_format(std::nullopt));
}

void buffer_cache_set_poison(bool on) { g_poison = on; }
bool buffer_cache_poison() { return g_poison.load(); }

BufferCacheStats buffer_cache_stats() { return cache().stats(); }
void buffer_cache_clear() { cache().clear(); }
void buffer_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cache_limit: expected a byte count >= 0, got ", bytes);
  cache().set_limit(static_cast<size_t>(bytes));
}

}  // namespace pyconv::cpu
