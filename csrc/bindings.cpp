// pybind11 module vidtok._C. No torch headers: Python passes data_ptr(), sizes, strides (elements),
// a dtype code and torch.cuda.current_stream().cuda_stream, so the module is torch-version independent.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "merge.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vidtok CUDA C++ kernels (raw pointers + stream; see csrc/)";
  m.attr("cuda_archs") = VIDTOK_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;

  m.def("paired_similarity_fwd", &vidtok::paired_similarity_fwd, py::arg("dtype"), py::arg("x"), py::arg("out"),
        py::arg("B"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("lag"), py::arg("sb"), py::arg("st"),
        py::arg("sn"), py::arg("sc"), py::arg("stream"),
        "out[B, T-lag, N] (fp32, contiguous) = cosine similarity of x[:, t+lag, n] and x[:, t, n].");
  m.def("paired_similarity_bwd", &vidtok::paired_similarity_bwd, py::arg("dtype"), py::arg("x"), py::arg("grad_out"),
        py::arg("grad_x"), py::arg("B"), py::arg("T"), py::arg("N"), py::arg("C"), py::arg("lag"), py::arg("sb"),
        py::arg("st"), py::arg("sn"), py::arg("sc"), py::arg("stream"),
        "grad_x[B, T, N, C] (x's dtype, contiguous) from grad_out[B, T-lag, N] (fp32, contiguous).");
  m.def(
      "device_count",
      []() {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
      },
      "CUDA devices visible to the runtime vidtok._C was linked against (0 when no driver).");
}
