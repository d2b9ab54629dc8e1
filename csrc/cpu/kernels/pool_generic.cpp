// Portable pooling loops for both layouts: element (ih, iw) of pair q sits at
// base(q) + (ih * W + iw) * pixel_stride, with pixel_stride 1 (NCHW) or C (channels_last).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels/io.h"
#include "cpu/kernels/pool_kernels.h"

namespace pyconv::cpu {
namespace {

struct Addressing {
  int64_t in_base, out_base, pix_in, pix_out;  // element offsets, pixel strides
};

inline Addressing address(const PoolShape& s, int64_t q) {
  if (!s.channels_last) return {q * s.H * s.W, q * s.OH * s.OW, 1, 1};
  const int64_t n = q / s.C, c = q % s.C;
  return {n * s.H * s.W * s.C + c, n * s.OH * s.OW * s.C + c, s.C, s.C};
}

template <typename A>
constexpr A kNoArgmax = static_cast<A>(~A{0});

template <typename Tag, typename A>
void max_fwd_t(const void* in_v, void* out_v, void* am_v, const PoolShape& s, int64_t q0,
               int64_t q1) {
  using T = typename Io<Tag>::T;
  using Acc = typename Io<Tag>::Acc;
  const T* in = static_cast<const T*>(in_v);
  T* out = static_cast<T*>(out_v);
  A* am = static_cast<A*>(am_v);
  for (int64_t q = q0; q < q1; ++q) {
    const Addressing a = address(s, q);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t h0 = oh * s.sH - s.pH, w0 = ow * s.sW - s.pW;
        Acc best = -std::numeric_limits<Acc>::infinity();
        int64_t bi = -1;
        for (int64_t kh = 0; kh < s.kH; ++kh) {
          const int64_t ih = h0 + kh * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t kw = 0; kw < s.kW; ++kw) {
            const int64_t iw = w0 + kw * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            const Acc v = Io<Tag>::load(in[a.in_base + (ih * s.W + iw) * a.pix_in]);
            if (bi < 0 || v > best || std::isnan(v)) {
              best = v;
              bi = kh * s.kW + kw;
            }
          }
        }
        const int64_t o = a.out_base + (oh * s.OW + ow) * a.pix_out;
        out[o] = Io<Tag>::store(best);
        am[o] = bi < 0 ? kNoArgmax<A> : static_cast<A>(bi);
      }
    }
  }
}

// Accumulates the gradient of pair q in Acc precision: directly in grad_in for float32/float64, in
// a float scratch plane for the 16-bit types.
template <typename Tag>
struct PlaneAccumulator {
  using T = typename Io<Tag>::T;
  using Acc = typename Io<Tag>::Acc;
  static constexpr bool kDirect = sizeof(T) == sizeof(Acc);
  T* grad_in;
  Addressing a;
  int64_t pixels;
  std::vector<Acc> scratch;

  PlaneAccumulator(T* g, const Addressing& addr, int64_t n) : grad_in(g), a(addr), pixels(n) {
    if (kDirect) {
      for (int64_t p = 0; p < pixels; ++p) grad_in[a.in_base + p * a.pix_in] = T(0);
    } else {
      scratch.assign(static_cast<size_t>(pixels), Acc(0));
    }
  }
  void add(int64_t pixel, Acc v) {
    if constexpr (kDirect) {
      grad_in[a.in_base + pixel * a.pix_in] += v;
    } else {
      scratch[static_cast<size_t>(pixel)] += v;
    }
  }
  void finish() {
    if constexpr (!kDirect) {
      for (int64_t p = 0; p < pixels; ++p) {
        grad_in[a.in_base + p * a.pix_in] = Io<Tag>::store(scratch[static_cast<size_t>(p)]);
      }
    }
  }
};

template <typename Tag, typename A>
void max_bwd_t(const void* go_v, const void* am_v, void* gi_v, const PoolShape& s, int64_t q0,
               int64_t q1) {
  using T = typename Io<Tag>::T;
  const T* go = static_cast<const T*>(go_v);
  const A* am = static_cast<const A*>(am_v);
  T* gi = static_cast<T*>(gi_v);
  for (int64_t q = q0; q < q1; ++q) {
    const Addressing a = address(s, q);
    PlaneAccumulator<Tag> acc(gi, a, s.H * s.W);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t o = a.out_base + (oh * s.OW + ow) * a.pix_out;
        const int64_t pos = argmax_position(s, oh, ow, static_cast<int64_t>(am[o]));
        if (pos < 0) continue;  // a window with no element inside the input
        acc.add(pos, Io<Tag>::load(go[o]));
      }
    }
    acc.finish();
  }
}

template <typename Tag>
void avg_fwd_t(const void* in_v, void* out_v, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io<Tag>::T;
  using Acc = typename Io<Tag>::Acc;
  const T* in = static_cast<const T*>(in_v);
  T* out = static_cast<T*>(out_v);
  for (int64_t q = q0; q < q1; ++q) {
    const Addressing a = address(s, q);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const int64_t h0 = oh * s.sH - s.pH;
      const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t w0 = ow * s.sW - s.pW;
        const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
        Acc sum = 0;
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) {
            sum += Io<Tag>::load(in[a.in_base + (ih * s.W + iw) * a.pix_in]);
          }
        }
        const bool empty = ih0 >= ih1 || iw0 >= iw1;
        const Acc v = empty ? Acc(0) : sum / static_cast<Acc>(avg_pool_divisor(s, oh, ow));
        out[a.out_base + (oh * s.OW + ow) * a.pix_out] = Io<Tag>::store(v);
      }
    }
  }
}

template <typename Tag>
void avg_bwd_t(const void* go_v, void* gi_v, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io<Tag>::T;
  using Acc = typename Io<Tag>::Acc;
  const T* go = static_cast<const T*>(go_v);
  T* gi = static_cast<T*>(gi_v);
  for (int64_t q = q0; q < q1; ++q) {
    const Addressing a = address(s, q);
    PlaneAccumulator<Tag> acc(gi, a, s.H * s.W);
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const int64_t h0 = oh * s.sH - s.pH;
      const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t w0 = ow * s.sW - s.pW;
        const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
        if (ih0 >= ih1 || iw0 >= iw1) continue;
        const Acc g = Io<Tag>::load(go[a.out_base + (oh * s.OW + ow) * a.pix_out]) /
                      static_cast<Acc>(avg_pool_divisor(s, oh, ow));
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) acc.add(ih * s.W + iw, g);
        }
      }
    }
    acc.finish();
  }
}

template <template <typename> class F, typename... Args>
void by_kind(ScalarKind kind, Args&&... args) {
  switch (kind) {
    case ScalarKind::kFloat:
      return F<float>::run(args...);
    case ScalarKind::kDouble:
      return F<double>::run(args...);
    case ScalarKind::kHalf:
      return F<HalfTag>::run(args...);
    case ScalarKind::kBFloat16:
      return F<BF16Tag>::run(args...);
  }
}

template <typename Tag>
struct MaxFwd {
  static void run(const void* in, void* out, void* am, int ab, const PoolShape& s, int64_t q0,
                  int64_t q1) {
    if (ab == 1) return max_fwd_t<Tag, uint8_t>(in, out, am, s, q0, q1);
    max_fwd_t<Tag, int32_t>(in, out, am, s, q0, q1);
  }
};
template <typename Tag>
struct MaxBwd {
  static void run(const void* go, const void* am, int ab, void* gi, const PoolShape& s, int64_t q0,
                  int64_t q1) {
    if (ab == 1) return max_bwd_t<Tag, uint8_t>(go, am, gi, s, q0, q1);
    max_bwd_t<Tag, int32_t>(go, am, gi, s, q0, q1);
  }
};
template <typename Tag>
struct AvgFwd {
  static void run(const void* in, void* out, const PoolShape& s, int64_t q0, int64_t q1) {
    avg_fwd_t<Tag>(in, out, s, q0, q1);
  }
};
template <typename Tag>
struct AvgBwd {
  static void run(const void* go, void* gi, const PoolShape& s, int64_t q0, int64_t q1) {
    avg_bwd_t<Tag>(go, gi, s, q0, q1);
  }
};

void max_fwd(const void* in, void* out, void* am, int ab, const PoolShape& s, int64_t q0,
             int64_t q1, ScalarKind kind) {
  by_kind<MaxFwd>(kind, in, out, am, ab, s, q0, q1);
}
void max_bwd(const void* go, const void* am, int ab, void* gi, const PoolShape& s, int64_t q0,
             int64_t q1, ScalarKind kind) {
  by_kind<MaxBwd>(kind, go, am, ab, gi, s, q0, q1);
}
void avg_fwd(const void* in, void* out, const PoolShape& s, int64_t q0, int64_t q1,
             ScalarKind kind) {
  by_kind<AvgFwd>(kind, in, out, s, q0, q1);
}
void avg_bwd(const void* go, void* gi, const PoolShape& s, int64_t q0, int64_t q1,
             ScalarKind kind) {
  by_kind<AvgBwd>(kind, go, gi, s, q0, q1);
}

}  // namespace

const PoolKernels& pool_kernels_generic() {
  static const PoolKernels k{"generic", &max_fwd, &max_bwd, &avg_fwd, &avg_bwd};
  return k;
}

}  // namespace pyconv::cpu
