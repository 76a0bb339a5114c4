// Row-sparse momentum SGD in one pass over each row (CPU), for pfc_ds.head.row_kernels.
//
// The eager update makes about twenty S x D passes over memory (fold the coefficient and the
// weight decay into the gradient, scale the momentum, add, step the weight, check, gather and
// scatter the momentum and the weight); this kernel reads each row's weight, gradient and
// momentum once and writes the weight and momentum once. Same arithmetic as the eager update,
// element by element, with contraction into FMAs turned off (-ffp-contract=off) so every
// variant here gives the same bits:
//   t  = coef + on * wd * scale            (per row)
//   g' = g + w * t
//   m  = m * mom + g' * inv_scale           (momentum > 0)
//   w  = w + m * (-lr)                      (or w + g' * (-lr * inv_scale) without momentum)
// A row whose `on` is 0 (masked out, or a non-finite window) is skipped: its weight, momentum
// and gradient are not read, so a NaN gradient there changes nothing.
#include <torch/extension.h>

#include <ATen/Parallel.h>

namespace {

constexpr int64_t kGrain = 32;  // rows per task: 32 x 512 fp32 = 64 KB per tensor

struct Factors {
  float wds;   // wd * scale
  float inv;   // 1 / scale
  float nlr;   // -lr
  float mom;   // momentum
};

Factors factors(double lr, double momentum, double wd, const torch::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu(), "scale must be one CPU value");
  const float s = scale.to(torch::kFloat32).item<float>();  // a CPU read: no device sync
  return {static_cast<float>(wd) * s, 1.0f / s, static_cast<float>(-lr),
          static_cast<float>(momentum)};
}

// One row: reads w_in, g, m (may be null), writes w_out, m. Returns 0 when every new weight is
// finite (and NaN otherwise): x * 0 is NaN exactly for inf and NaN, and the sum keeps it.
inline float row(const float* w_in, const float* g, float* m, float* w_out, int64_t D,
                 float t, const Factors& f) {
  float bad = 0.0f;
  if (m != nullptr) {
#pragma omp simd reduction(+ : bad)
    for (int64_t d = 0; d < D; ++d) {
      const float w = w_in[d];
      const float gi = g[d] + w * t;
      const float mi = m[d] * f.mom + gi * f.inv;
      const float wi = w + mi * f.nlr;
      m[d] = mi;
      w_out[d] = wi;
      bad += wi * 0.0f;
    }
  } else {
    const float k = f.nlr * f.inv;
#pragma omp simd reduction(+ : bad)
    for (int64_t d = 0; d < D; ++d) {
      const float w = w_in[d];
      const float wi = w + (g[d] + w * t) * k;
      w_out[d] = wi;
      bad += wi * 0.0f;
    }
  }
  return bad;
}

void check_rows(const torch::Tensor& x, int64_t R, int64_t D, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 &&
                  x.is_contiguous() && x.size(0) == R && x.size(1) == D,
              name, " must be a contiguous CPU float32 [", R, ", ", D, "] tensor");
}

void check_vec(const torch::Tensor& x, int64_t R, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() &&
                  (x.numel() == R || x.numel() == 1),
              name, " must be a contiguous CPU float32 tensor of ", R, " values or one");
}

// Rows updated where they are: w [R, D] and m [R, D] (or an empty tensor: no momentum) in
// place; g [R, D]; coef [R]; on [R] or one value (0 or 1).
void sgd_block(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor coef,
               torch::Tensor on, torch::Tensor scale, double lr, double momentum, double wd) {
  const int64_t R = w.size(0), D = w.dim() == 2 ? w.size(1) : 0;
  check_rows(w, R, D, "weight");
  check_rows(g, R, D, "grad");
  const bool mom = m.numel() > 0;
  if (mom) check_rows(m, R, D, "momentum");
  check_vec(coef, R, "coef");
  check_vec(on, R, "on");
  const Factors f = factors(lr, momentum, wd, scale);
  float* W = w.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  float* M = mom ? m.data_ptr<float>() : nullptr;
  const float* C = coef.data_ptr<float>();
  const float* O = on.data_ptr<float>();
  const bool one = on.numel() == 1 && R != 1;
  at::parallel_for(0, R, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float o = O[one ? 0 : i];
      if (o == 0.0f) continue;
      row(W + i * D, G + i * D, mom ? M + i * D : nullptr, W + i * D, D, C[i] + o * f.wds, f);
    }
  });
}

// Rows read from the window and written straight into the bank: w [R, D] (the window's fp32
// rows), g [R, D], coef [R], on [R] or one value; bank_w [N, D] and bank_m [N, D] (or empty)
// are updated at the distinct rows idx [R]. Returns a 0-dim bool: every new weight finite.
torch::Tensor sgd_scatter(torch::Tensor bank_w, torch::Tensor bank_m, torch::Tensor idx,
                          torch::Tensor w, torch::Tensor g, torch::Tensor coef, torch::Tensor on,
                          torch::Tensor scale, double lr, double momentum, double wd) {
  const int64_t R = w.size(0), D = w.dim() == 2 ? w.size(1) : 0, N = bank_w.size(0);
  check_rows(w, R, D, "weight");
  check_rows(g, R, D, "grad");
  check_rows(bank_w, N, D, "bank weight");
  const bool mom = bank_m.numel() > 0;
  if (mom) check_rows(bank_m, N, D, "bank momentum");
  check_vec(coef, R, "coef");
  check_vec(on, R, "on");
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == torch::kInt64 && idx.dim() == 1 &&
                  idx.is_contiguous() && idx.size(0) == R,
              "index must be a contiguous CPU int64 tensor of ", R, " rows");
  const Factors f = factors(lr, momentum, wd, scale);
  float* BW = bank_w.data_ptr<float>();
  float* BM = mom ? bank_m.data_ptr<float>() : nullptr;
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* W = w.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  const float* C = coef.data_ptr<float>();
  const float* O = on.data_ptr<float>();
  const bool one = on.numel() == 1 && R != 1;
  std::atomic<bool> finite{true};
  at::parallel_for(0, R, kGrain, [&](int64_t a, int64_t b) {
    float bad = 0.0f;
    for (int64_t i = a; i < b; ++i) {
      const float o = O[one ? 0 : i];
      if (o == 0.0f) continue;
      const int64_t r = I[i];
      TORCH_CHECK(r >= 0 && r < N, "row ", r, " outside the bank's ", N, " rows");
      bad += row(W + i * D, G + i * D, mom ? BM + r * D : nullptr, BW + r * D, D,
                 C[i] + o * f.wds, f);
    }
    if (bad != 0.0f) finite = false;  // NaN != 0 too
  });
  return torch::scalar_tensor(finite.load(), torch::kBool);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_block", &sgd_block, "row-sparse momentum SGD on rows in place");
  m.def("sgd_scatter", &sgd_scatter, "row-sparse momentum SGD written into the bank's rows");
}
