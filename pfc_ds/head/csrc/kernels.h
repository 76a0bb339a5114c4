// The head's compiled CPU kernels, bound to Python in bindings.cpp (pfc_ds.head.cpu_kernels).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace pfc_ds {

// row_sgd.cpp: row-sparse momentum SGD, in place or written into the bank's rows.
void sgd_block(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor coef,
               torch::Tensor on, torch::Tensor scale, double lr, double momentum, double wd);
torch::Tensor sgd_scatter(torch::Tensor bank_w, torch::Tensor bank_m, torch::Tensor idx,
                          torch::Tensor w, torch::Tensor g, torch::Tensor coef, torch::Tensor on,
                          torch::Tensor scale, double lr, double momentum, double wd,
                          int64_t row_offset, std::vector<int64_t> keys);
bool set_f16c(bool on);

// margin_softmax.cpp: one chunk of the streamed margin softmax, forward and backward.
void margin_forward(torch::Tensor block, torch::Tensor inv_norm, torch::Tensor target,
                    int64_t c0, torch::Tensor active, torch::Tensor t_logit,
                    torch::Tensor run_max, torch::Tensor run_sum, double s, double bound,
                    double thr);
torch::Tensor margin_backward(torch::Tensor cos, torch::Tensor out, bool raw,
                              torch::Tensor inv_norm, torch::Tensor step, torch::Tensor target,
                              int64_t c0, torch::Tensor active, torch::Tensor t_logit,
                              torch::Tensor lse, torch::Tensor d_margin, double s, double bound,
                              double thr, torch::Tensor coef, bool accumulate);
bool set_avx2(bool on);

}  // namespace pfc_ds
