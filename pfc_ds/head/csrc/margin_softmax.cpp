// The streamed margin softmax's per-chunk passes (CPU), for pfc_ds.head.margin_softmax.
//
// In eager ops one chunk of N x C cosines costs about thirteen passes over memory: scale by the
// row norms, clamp, scale by s, filter, place the target logits, mask, max, subtract, exp, sum
// (forward), and again exp, the target's and the masks' fixes, the scale by r * step and the
// normalisation's column sums (backward). Here the forward is one read and write of the block
// (cosines in place) plus a re-read of each row from cache, the backward one read of the
// cosines and one write of the gradient, with every row's max/sum-exp, every column's
// coefficient and the gradient's largest magnitude computed on the way.
//
// The arithmetic is the eager path's, operation by operation, except exp: a Cephes-style
// polynomial (about 1 ulp, flushed to 0 below -87) that the compiler vectorises, and sums
// taken in blocks of 512 lanes-wise, then in double. Rows are split across threads in the
// forward and column tiles in the backward, with fixed blocking, so the results do not depend
// on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace pfc_ds {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kBig = std::numeric_limits<float>::max();
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
constexpr float kExpMin = -87.0f;      // exp below this is taken as 0 (exp(-87) ~ 1.6e-38)
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr int64_t kLanes = 8;        // sums are kept in 8 lanes (column j in lane j % 8)
constexpr int64_t kSumBlock = 512;   // columns per fp32 partial sum, added up in double
constexpr int64_t kTile = 1024;      // backward: columns per task

// Two versions of every loop compute the same bits: portable C++ (the default) and AVX2
// intrinsics (chosen at run time where the CPU has AVX2), each operation the same fp32
// operation in the same order, no FMA (-ffp-contract=off), and sums in the same 8 lanes added
// up in the same tree. Tests compare them bit for bit (set_avx2).

// exp(x) for x < 88; 0 below kExpMin (and for -inf); NaN stays NaN.
inline float exp_s(float x) {
  const float xc = x < kExpMin ? kExpMin : x;
  const float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP[0];
  for (int k = 1; k < 6; ++k) p = p * r + kP[k];
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kExpMin ? 0.0f : p * scale;
}

inline float clamp_s(float c, float bound) {
  return c < -bound ? -bound : (c > bound ? bound : c);  // NaN stays NaN, as torch.clamp
}

inline float lanes_total(const float* a) {  // the fixed tree both versions add lanes in
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

struct Margin {
  float s;      // logit scale
  float bound;  // cosines clamped to [-bound, bound]
  float thr;    // inter-class filter threshold (0: off)
};

// The chunk's per-row inputs and options.
struct Rows {
  const float* r;         // [C] inverse row norms
  const uint8_t* act;     // [C] columns in the loss, or null: all
  const int32_t* tc;      // [N] target column in the chunk, or -1
  const float* tl;        // [N] target logits
  Margin m;
};

// ---- portable versions -----------------------------------------------------------------

// A non-target cosine's logit, before the active mask.
inline float logit_s(float c, const Margin& m) {
  return (m.thr > 0.0f && c > m.thr) ? 0.0f : m.s * c;
}

// Columns [j0, C) of a forward row: cosines in place; returns their max logit, NaN flag in nan.
float cosines_s(float* b, const Rows& q, int64_t i, int64_t j0, int64_t C, float mx, bool& nan) {
  for (int64_t j = j0; j < C; ++j) {
    const float c = clamp_s(b[j] * q.r[j], q.m.bound);
    b[j] = c;
    float l = j == q.tc[i] ? q.tl[i] : logit_s(c, q.m);
    if (q.act != nullptr && q.act[j] == 0) l = -kInf;
    nan |= l != l;
    mx = mx > l ? mx : l;
  }
  return mx;
}

// Adds exp(logit_j - top) over columns [j0, j1) into lane j % 8.
void sum_s(const float* b, const Rows& q, int64_t i, int64_t j0, int64_t j1, float top,
           float* lanes) {
  for (int64_t j = j0; j < j1; ++j) {
    float l = j == q.tc[i] ? q.tl[i] : logit_s(b[j], q.m);
    if (q.act != nullptr && q.act[j] == 0) l = -kInf;
    lanes[j % kLanes] += exp_s(l - top);
  }
}

struct Backward {
  const float* cos;  // [N, C] cosines (or dot products: raw)
  float* out;        // [N, C] dL/dcos * r
  int64_t C;
  bool raw;
  float step;
  const float* lse;  // [N]
  const float* dm;   // [N] the margin's derivative at the target
};

// Row i, columns [j0, j1) of the backward; colsum and the max |g| / bad flag accumulate.
void backward_s(const Backward& k, const Rows& q, int64_t i, int64_t j0, int64_t j1,
                float* colsum, float& amax, bool& bad) {
  const bool clamps = q.m.bound < 1.0f;
  const float* c = k.cos + i * k.C;
  float* o = k.out + i * k.C;
  for (int64_t j = j0; j < j1; ++j) {
    const float rj = q.r[j];
    const float cj = k.raw ? clamp_s(c[j] * rj, q.m.bound) : c[j];
    const bool target = j == q.tc[i];
    const bool dirty = !target && q.m.thr > 0.0f && cj > q.m.thr;
    const float l = target ? q.tl[i] : (dirty ? 0.0f : q.m.s * cj);
    float p = exp_s(l - k.lse[i]);
    if (q.act != nullptr && q.act[j] == 0) p = 0.0f;
    if (target) p = (p - 1.0f) * k.dm[i];
    if (dirty) p = 0.0f;
    if (clamps && !target && std::fabs(cj) >= q.m.bound) p = 0.0f;
    const float g = p * (rj * k.step);
    o[j] = g;
    colsum[j - j0] += cj * g;
    const float a = std::fabs(g);
    bad |= !(a <= kBig);
    amax = amax > a ? amax : a;
  }
}

// ---- AVX2 versions ---------------------------------------------------------------------

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PFC_AVX2 1
bool use_avx2 = __builtin_cpu_supports("avx2");

#define AVX2 __attribute__((target("avx2"))) inline

AVX2 __m256 exp_v(__m256 x) {
  const __m256 vmin = _mm256_set1_ps(kExpMin);
  const __m256 xc = _mm256_max_ps(vmin, x);  // NaN x stays NaN (max_ps returns its 2nd)
  const __m256 rnd = _mm256_set1_ps(kRound);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), rnd), rnd);
  __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kP[k]));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, vmin, _CMP_LT_OQ));
}

AVX2 __m256 clamp_v(__m256 c, __m256 bound) {  // NaN stays NaN: min/max_ps return their 2nd
  const __m256 neg = _mm256_sub_ps(_mm256_setzero_ps(), bound);
  return _mm256_min_ps(bound, _mm256_max_ps(neg, c));
}

AVX2 __m256 is_column(int64_t j, int32_t tc) {  // lanes whose column j + lane is tc
  const __m256i cols = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(cols, _mm256_set1_epi32(tc)));
}

AVX2 __m256 inactive(const uint8_t* act) {  // lanes whose column is out of the loss
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(act)));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
}

AVX2 __m256 logit_v(__m256 c, const Margin& m) {
  const __m256 l = _mm256_mul_ps(_mm256_set1_ps(m.s), c);
  if (!(m.thr > 0.0f)) return l;
  return _mm256_blendv_ps(l, _mm256_setzero_ps(),
                          _mm256_cmp_ps(c, _mm256_set1_ps(m.thr), _CMP_GT_OQ));
}

AVX2 float hmax(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  float mx = a[0];
  for (int k = 1; k < 8; ++k) mx = mx > a[k] ? mx : a[k];
  return mx;
}

// As cosines_s over [0, C): returns the max logit, NaN flag in nan.
AVX2 float cosines_v(float* b, const Rows& q, int64_t i, int64_t C, bool& nan) {
  const __m256 bound = _mm256_set1_ps(q.m.bound), tl = _mm256_set1_ps(q.tl[i]);
  const __m256 ninf = _mm256_set1_ps(-kInf);
  __m256 mx = ninf, bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) {
    const __m256 c = clamp_v(_mm256_mul_ps(_mm256_loadu_ps(b + j), _mm256_loadu_ps(q.r + j)), bound);
    _mm256_storeu_ps(b + j, c);
    __m256 l = _mm256_blendv_ps(logit_v(c, q.m), tl, is_column(j, q.tc[i]));
    if (q.act != nullptr) l = _mm256_blendv_ps(l, ninf, inactive(q.act + j));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(l, l, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, l);
  }
  nan |= _mm256_movemask_ps(bad) != 0;
  return cosines_s(b, q, i, j, C, hmax(mx), nan);
}

// As sum_s over [j0, j1), j0 a multiple of 8.
AVX2 void sum_v(const float* b, const Rows& q, int64_t i, int64_t j0, int64_t j1, float top,
                float* lanes) {
  const __m256 tl = _mm256_set1_ps(q.tl[i]), vtop = _mm256_set1_ps(top);
  const __m256 ninf = _mm256_set1_ps(-kInf);
  __m256 acc = _mm256_loadu_ps(lanes);
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    __m256 l = _mm256_blendv_ps(logit_v(_mm256_loadu_ps(b + j), q.m), tl, is_column(j, q.tc[i]));
    if (q.act != nullptr) l = _mm256_blendv_ps(l, ninf, inactive(q.act + j));
    acc = _mm256_add_ps(acc, exp_v(_mm256_sub_ps(l, vtop)));
  }
  _mm256_storeu_ps(lanes, acc);
  sum_s(b, q, i, j, j1, top, lanes);
}

// As backward_s over [j0, j1), j0 a multiple of 8.
AVX2 void backward_v(const Backward& k, const Rows& q, int64_t i, int64_t j0, int64_t j1,
                     float* colsum, float& amax, bool& bad) {
  const float* c = k.cos + i * k.C;
  float* o = k.out + i * k.C;
  const __m256 bound = _mm256_set1_ps(q.m.bound), s = _mm256_set1_ps(q.m.s);
  const __m256 thr = _mm256_set1_ps(q.m.thr), tl = _mm256_set1_ps(q.tl[i]);
  const __m256 lse = _mm256_set1_ps(k.lse[i]), dm = _mm256_set1_ps(k.dm[i]);
  const __m256 step = _mm256_set1_ps(k.step), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps(), big = _mm256_set1_ps(kBig);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const bool filter = q.m.thr > 0.0f, clamps = q.m.bound < 1.0f;
  __m256 vmax = _mm256_set1_ps(amax), vbad = zero;
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    const __m256 rj = _mm256_loadu_ps(q.r + j);
    __m256 cj = _mm256_loadu_ps(c + j);
    if (k.raw) cj = clamp_v(_mm256_mul_ps(cj, rj), bound);
    const __m256 target = is_column(j, q.tc[i]);
    const __m256 dirty =
        filter ? _mm256_andnot_ps(target, _mm256_cmp_ps(cj, thr, _CMP_GT_OQ)) : zero;
    const __m256 l = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_mul_ps(s, cj), zero, dirty), tl, target);
    __m256 p = exp_v(_mm256_sub_ps(l, lse));
    if (q.act != nullptr) p = _mm256_blendv_ps(p, zero, inactive(q.act + j));
    p = _mm256_blendv_ps(p, _mm256_mul_ps(_mm256_sub_ps(p, one), dm), target);
    p = _mm256_blendv_ps(p, zero, dirty);
    if (clamps) {
      const __m256 edge = _mm256_cmp_ps(_mm256_and_ps(cj, absmask), bound, _CMP_GE_OQ);
      p = _mm256_blendv_ps(p, zero, _mm256_andnot_ps(target, edge));
    }
    const __m256 g = _mm256_mul_ps(p, _mm256_mul_ps(rj, step));
    _mm256_storeu_ps(o + j, g);
    float* cs = colsum + (j - j0);
    _mm256_storeu_ps(cs, _mm256_add_ps(_mm256_loadu_ps(cs), _mm256_mul_ps(cj, g)));
    const __m256 a = _mm256_and_ps(g, absmask);
    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));
    vmax = _mm256_max_ps(vmax, a);
  }
  bad |= _mm256_movemask_ps(vbad) != 0;
  amax = hmax(vmax);
  backward_s(k, q, i, j, j1, colsum + (j - j0), amax, bad);
}
#undef AVX2
#endif

void check_block(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 &&
                  x.is_contiguous(),
              name, " must be a contiguous 2-D CPU float32 tensor");
}

void check_vec(const torch::Tensor& x, int64_t n, torch::ScalarType t, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == t && x.dim() == 1 &&
                  x.is_contiguous() && x.size(0) == n,
              name, " must be a contiguous CPU ", c10::toString(t), " tensor of ", n, " values");
}

const uint8_t* active_ptr(const torch::Tensor& active, int64_t C) {
  if (active.numel() == 0) return nullptr;
  check_vec(active, C, torch::kBool, "active");
  return reinterpret_cast<const uint8_t*>(active.data_ptr<bool>());
}

// Each row's target column inside [c0, c0 + C), or -1.
std::vector<int32_t> target_columns(const torch::Tensor& target, int64_t N, int64_t c0,
                                    int64_t C) {
  check_vec(target, N, torch::kInt64, "target");
  TORCH_CHECK(C < (int64_t{1} << 31), "a chunk must have fewer than 2^31 columns");
  const int64_t* t = target.data_ptr<int64_t>();
  std::vector<int32_t> tc(N);
  for (int64_t i = 0; i < N; ++i) {
    tc[i] = (t[i] >= c0 && t[i] < c0 + C) ? static_cast<int32_t>(t[i] - c0) : -1;
  }
  return tc;
}

bool avx2() {
#ifdef PFC_AVX2
  return use_avx2;
#else
  return false;
#endif
}

// One forward row: cosines in place, then the row's sum of exps against the new running max.
void forward_row(float* b, const Rows& q, int64_t i, int64_t C, float* run_max,
                 float* run_sum) {
  const bool v = avx2();
  bool nan = false;
  float mx;
#ifdef PFC_AVX2
  if (v) {
    mx = cosines_v(b, q, i, C, nan);
  } else
#endif
  {
    mx = cosines_s(b, q, i, 0, C, -kInf, nan);
  }
  if (nan) mx = std::numeric_limits<float>::quiet_NaN();
  const float old = run_max[i];
  const float top = (mx != mx || old != old) ? mx + old : std::fmax(old, mx);  // NaN wins
  double total = 0.0;
  for (int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
    const int64_t j1 = j0 + kSumBlock < C ? j0 + kSumBlock : C;
    float lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
#ifdef PFC_AVX2
    if (v) {
      sum_v(b, q, i, j0, j1, top, lanes);
    } else
#endif
    {
      sum_s(b, q, i, j0, j1, top, lanes);
    }
    total += lanes_total(lanes);
  }
  run_sum[i] = run_sum[i] * std::exp(old - top) + static_cast<float>(total);
  run_max[i] = top;
}

}  // namespace

void margin_forward(torch::Tensor block, torch::Tensor inv_norm, torch::Tensor target,
                    int64_t c0, torch::Tensor active, torch::Tensor t_logit,
                    torch::Tensor run_max, torch::Tensor run_sum, double s, double bound,
                    double thr) {
  check_block(block, "block");
  const int64_t N = block.size(0), C = block.size(1);
  check_vec(inv_norm, C, torch::kFloat32, "inv_norm");
  check_vec(t_logit, N, torch::kFloat32, "t_logit");
  check_vec(run_max, N, torch::kFloat32, "run_max");
  check_vec(run_sum, N, torch::kFloat32, "run_sum");
  const std::vector<int32_t> tc = target_columns(target, N, c0, C);
  const Rows q{inv_norm.data_ptr<float>(), active_ptr(active, C), tc.data(),
               t_logit.data_ptr<float>(),
               {static_cast<float>(s), static_cast<float>(bound), static_cast<float>(thr)}};
  float* B = block.data_ptr<float>();
  float* RM = run_max.data_ptr<float>();
  float* RS = run_sum.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) forward_row(B + i * C, q, i, C, RM, RS);
  });
}

torch::Tensor margin_backward(torch::Tensor cos, torch::Tensor out, bool raw,
                              torch::Tensor inv_norm, torch::Tensor step, torch::Tensor target,
                              int64_t c0, torch::Tensor active, torch::Tensor t_logit,
                              torch::Tensor lse, torch::Tensor d_margin, double s, double bound,
                              double thr, torch::Tensor coef, bool accumulate) {
  check_block(cos, "cos");
  check_block(out, "out");
  const int64_t N = cos.size(0), C = cos.size(1);
  TORCH_CHECK(out.size(0) == N && out.size(1) == C, "out must be shaped as cos");
  check_vec(inv_norm, C, torch::kFloat32, "inv_norm");
  check_vec(t_logit, N, torch::kFloat32, "t_logit");
  check_vec(lse, N, torch::kFloat32, "lse");
  check_vec(d_margin, N, torch::kFloat32, "d_margin");
  check_vec(coef, C, torch::kFloat32, "coef");
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "step must be one CPU value");
  const std::vector<int32_t> tc = target_columns(target, N, c0, C);
  const Rows q{inv_norm.data_ptr<float>(), active_ptr(active, C), tc.data(),
               t_logit.data_ptr<float>(),
               {static_cast<float>(s), static_cast<float>(bound), static_cast<float>(thr)}};
  const Backward k{cos.data_ptr<float>(), out.data_ptr<float>(), C, raw,
                   step.to(torch::kFloat32).item<float>(),  // a CPU read: no device sync
                   lse.data_ptr<float>(), d_margin.data_ptr<float>()};
  float* K = coef.data_ptr<float>();
  const bool v = avx2();
  const int64_t tiles = (C + kTile - 1) / kTile;
  std::vector<float> amax(tiles, 0.0f);
  std::vector<uint8_t> bad(tiles, 0);
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t b) {
    float colsum[kTile];
    for (int64_t t = a; t < b; ++t) {
      const int64_t j0 = t * kTile, j1 = j0 + kTile < C ? j0 + kTile : C;
      std::fill(colsum, colsum + (j1 - j0), 0.0f);
      float mx = 0.0f;
      bool nonfinite = false;
      for (int64_t i = 0; i < N; ++i) {
#ifdef PFC_AVX2
        if (v) {
          backward_v(k, q, i, j0, j1, colsum, mx, nonfinite);
          continue;
        }
#endif
        backward_s(k, q, i, j0, j1, colsum, mx, nonfinite);
      }
      // The normalisation's coefficient, -r_j^2 sum_i dL/dcos_ij cos_ij (g carries one r).
      for (int64_t j = j0; j < j1; ++j) {
        const float c = -(colsum[j - j0] * q.r[j]);
        K[j] = accumulate ? K[j] + c : c;
      }
      amax[t] = mx;
      bad[t] = nonfinite;
    }
  });
  float top = 0.0f;
  for (int64_t t = 0; t < tiles; ++t) top = bad[t] ? kInf : (top > amax[t] ? top : amax[t]);
  return torch::scalar_tensor(top, torch::kFloat32);
}

// Turn the AVX2 loops off or back on (where the CPU has them); returns whether they were on.
bool set_avx2(bool on) {
#ifdef PFC_AVX2
  const bool was = use_avx2;
  use_avx2 = on && __builtin_cpu_supports("avx2");
  return was;
#else
  (void)on;
  return false;
#endif
}

}  // namespace pfc_ds
