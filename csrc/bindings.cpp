// pyconv._C: importing it registers the operators (ops.cpp and the backend files); its own
// functions say what was built and what runs here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/conv_path.h"
#include "common/philox.h"
#include "cpu/buffer_cache.h"
#include "cpu/simd.h"

#ifndef PYCONV_VERSION
#define PYCONV_VERSION "unknown"
#endif
#ifndef PYCONV_TORCH_VERSION
#define PYCONV_TORCH_VERSION "unknown"
#endif
#ifndef PYCONV_CUDA_ARCHS
#define PYCONV_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

bool cuda_compiled() {
#ifdef PYCONV_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Philox4x32-10 of one counter and key, for known-answer tests of the shared generator.
std::vector<uint32_t> philox(const std::vector<uint32_t>& counter,
                             const std::vector<uint32_t>& key) {
  if (counter.size() != 4 || key.size() != 2) {
    throw py::value_error("philox: expected a counter of 4 words and a key of 2 words");
  }
  const pyconv::Philox4 r =
      pyconv::philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  return {r.x[0], r.x[1], r.x[2], r.x[3]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyconv compiled kernels";
  m.def("version", [] { return std::string(PYCONV_VERSION); });
  m.def("torch_version", [] { return std::string(PYCONV_TORCH_VERSION); });
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_archs", [] { return std::string(PYCONV_CUDA_ARCHS); });
  m.def("cpu_has_avx2", &pyconv::cpu::cpu_has_avx2);
  m.def("cpu_has_avx512", &pyconv::cpu::cpu_has_avx512);
  m.def("simd_path", &pyconv::cpu::simd_path);
  m.def("set_simd_path", &pyconv::cpu::set_simd_path, py::arg("name"));
  m.def("philox", &philox, py::arg("counter"), py::arg("key"));
  m.def("cpu_cache_stats", [] {
    const auto s = pyconv::cpu::buffer_cache_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  m.def("cpu_cache_clear", &pyconv::cpu::buffer_cache_clear);
  m.def("cpu_cache_set_limit", &pyconv::cpu::buffer_cache_set_limit, py::arg("bytes"));
  m.def("cpu_cache_set_poison", &pyconv::cpu::buffer_cache_set_poison, py::arg("on"));
  // The CUDA conv2d kernel family: "auto" (per shape), "gemm" or "direct" (tests force each).
  m.def(
      "set_cuda_conv_path",
      [](const std::string& name) {
        int v = -1;
        if (name == "auto") v = pyconv::kConvPathAuto;
        if (name == "gemm") v = pyconv::kConvPathGemm;
        if (name == "direct") v = pyconv::kConvPathDirect;
        TORCH_CHECK(v >= 0, "set_cuda_conv_path: expected 'auto', 'gemm' or 'direct', got '", name,
                    "'");
        pyconv::conv_path_cuda_flag() = v;
      },
      py::arg("name"));
  m.def("cuda_conv_path", [] {
    const int v = pyconv::conv_path_cuda();
    return std::string(v == pyconv::kConvPathGemm     ? "gemm"
                       : v == pyconv::kConvPathDirect ? "direct"
                                                      : "auto");
  });
}
