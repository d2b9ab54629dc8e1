// Per-thread scratch memory for the kernels' buffers that are written before they are read (padded
// rows, accumulators cleared by their users): kept between calls, so that a call neither allocates
// nor zeroes it again. Each slot is one buffer; a function holding several at once uses distinct
// slots.
#pragma once

#include <cstddef>
#include <memory>

namespace pyconv::cpu {

// n elements of T for slot kSlot of the calling thread, uninitialised; valid until this thread
// asks for the same slot and type again. A slot grows to its largest request and is kept for the
// thread's life (a few MiB at most: the direct kernels' padded rows of one image).
template <typename T, int kSlot>
T* thread_scratch(size_t n) {
  thread_local std::unique_ptr<T[]> data;
  thread_local size_t capacity = 0;
  if (capacity < n) {
    data.reset(new T[n]);  // default-initialised: not zeroed
    capacity = n;
  }
  return data.get();
}

}  // namespace pyconv::cpu
