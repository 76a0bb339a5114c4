// Python bindings of the head's CPU kernels (kernels.h), loaded by pfc_ds.head.cpu_kernels.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_block", &pfc_ds::sgd_block, "row-sparse momentum SGD on rows in place");
  m.def("sgd_scatter", &pfc_ds::sgd_scatter,
        "row-sparse momentum SGD written into the bank's rows");
  m.def("set_f16c", &pfc_ds::set_f16c,
        "use F16C's conversions for fp16 rows (where the CPU has them)");
  m.def("margin_forward", &pfc_ds::margin_forward,
        "one forward chunk: cosines in place, running max and sum-exp per row");
  m.def("margin_backward", &pfc_ds::margin_backward,
        "one backward chunk: dL/dcos * r, the normalisation's coefficients, max |grad|");
  m.def("set_avx2", &pfc_ds::set_avx2,
        "use the margin softmax's AVX2 loops (where the CPU has them)");
}
