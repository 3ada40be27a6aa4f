// pybind11 module vidtok._C. No torch headers: Python passes data_ptr(), sizes, strides (elements),
// a dtype code and torch.cuda.current_stream().cuda_stream, so the module is torch-version independent.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "merge.h"
#include "select.h"
#include "motion.h"

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
  m.def("block_match", &vidtok::block_match, py::arg("dtype"), py::arg("cur"), py::arg("ref"), py::arg("motion"),
        py::arg("cost"), py::arg("B"), py::arg("H"), py::arg("W"), py::arg("block"), py::arg("radius"),
        py::arg("csb"), py::arg("csh"), py::arg("csw"), py::arg("rsb"), py::arg("rsh"), py::arg("rsw"),
        py::arg("stream"),
        "motion[B, H/block, W/block, 2] (int16, contiguous) and cost[B, H/block, W/block] (fp32, contiguous): "
        "exhaustive SAD block matching of cur against ref [B, H, W] (uint8 or float codes).");
  m.def("block_match_shared_bytes", &vidtok::block_match_shared_bytes, py::arg("dtype"), py::arg("block"),
        py::arg("radius"), "Dynamic shared memory block_match asks for; it runs when <= block_match_shared_limit.");
  m.attr("block_match_shared_limit") = vidtok::kBlockMatchSharedLimit;
  m.def("select_gram", &vidtok::select_gram, py::arg("xt"), py::arg("gram"), py::arg("B"), py::arg("T"), py::arg("C"),
        py::arg("stream"),
        "gram[B, T, T] (fp32) = Gram matrix of the unit rows xt[B, C, T] (fp32, channel-major), each entry one "
        "fmaf chain over c = 0..C-1.");
  m.def("greedy_select", &vidtok::greedy_select, py::arg("rel"), py::arg("pos"), py::arg("pos_sb"), py::arg("xt"),
        py::arg("gram"), py::arg("ms"), py::arg("picks"), py::arg("B"), py::arg("Q"), py::arg("T"), py::arg("C"),
        py::arg("k"), py::arg("mmr"), py::arg("lam"), py::arg("use_thresh"), py::arg("sim_thresh"), py::arg("use_gap"),
        py::arg("min_gap"), py::arg("force_global_state"), py::arg("stream"),
        "picks[B*Q, k] (int32, pre-filled with -1) in pick order: persistent greedy / MMR / NMS selection over "
        "rel[B*Q, T] (fp32, NaN = not a candidate; see csrc/select.h).");
  m.def("dpp_select", &vidtok::dpp_select, py::arg("q"), py::arg("diag"), py::arg("thr"), py::arg("xt"),
        py::arg("gram"), py::arg("d2"), py::arg("cf"), py::arg("picks"), py::arg("d2_pick"), py::arg("B"), py::arg("Q"),
        py::arg("T"), py::arg("C"), py::arg("k"), py::arg("force_global_state"), py::arg("stream"),
        "picks[B*Q, k] (int32) and d2_pick[B*Q, k] (fp32) in pick order: persistent greedy DPP MAP (Chen et al. "
        "2018; see csrc/select.h).");
  m.def(
      "device_count",
      []() {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
      },
      "CUDA devices visible to the runtime vidtok._C was linked against (0 when no driver).");
}
