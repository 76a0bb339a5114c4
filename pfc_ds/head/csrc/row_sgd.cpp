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
// and gradient are not read, so a NaN gradient there changes nothing. The scatter stores fp16
// and bf16 banks with stochastic rounding whose bits are those of pfc_ds/head/rounding.py,
// bit for bit, so its results equal a block update followed by the bank's own rounded write.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace pfc_ds {
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

// One row in place (the block kernel): reads w, g, m (may be null), writes w and m.
inline void row(float* w, const float* g, float* m, int64_t D, float t, const Factors& f) {
  if (m != nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float wd = w[d];
      const float gi = g[d] + wd * t;
      const float mi = m[d] * f.mom + gi * f.inv;
      m[d] = mi;
      w[d] = wd + mi * f.nlr;
    }
  } else {
    const float k = f.nlr * f.inv;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float wd = w[d];
      w[d] = wd + (g[d] + wd * t) * k;
    }
  }
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

}  // namespace

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
      row(W + i * D, G + i * D, mom ? M + i * D : nullptr, D, C[i] + o * f.wds, f);
    }
  });
}

namespace {

// ---- stochastic rounding, bit for bit as pfc_ds/head/rounding.py computes it ----------------

inline uint32_t fmix32(uint32_t h) {  // murmur3's finaliser (rounding._fmix32)
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline uint32_t row_key(int64_t row, uint32_t k0, uint32_t k1) {  // rounding.row_keys
  const uint64_t r = static_cast<uint64_t>(row);
  const uint32_t h = fmix32(static_cast<uint32_t>(r) ^ k0);
  return fmix32(h ^ static_cast<uint32_t>(r >> 32) ^ k1);
}

inline uint32_t column_key(int64_t col) {  // rounding.column_keys
  return fmix32(static_cast<uint32_t>(col) ^ 0x3C6EF372u);
}

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// fp16 <-> fp32 in integer and float ops that vectorise (c10::Half's scalar conversions do not,
// and F16C is not assumed: the venv may move hosts). IEEE round-to-nearest-even with subnormals,
// inf and NaN (0x7E00 | sign), the results of c10::Half and of torch's conversions (after F.
// Giesen's float_to_half_fast3_rtne and half_to_float).
inline uint16_t half_bits(float f) {
  const uint32_t sign = bits_of(f) & 0x80000000u;
  const uint32_t u = bits_of(f) ^ sign;
  const float denorm_magic = float_of(((127 - 15) + (23 - 10) + 1) << 23);
  const uint32_t sub = bits_of(float_of(u) + denorm_magic) - bits_of(denorm_magic);
  const uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  const uint32_t big = u > (255u << 23) ? 0x7E00u : 0x7C00u;
  const uint32_t o = u >= ((127u + 16u) << 23) ? big : (u < (113u << 23) ? sub : normal);
  return static_cast<uint16_t>(o | (sign >> 16));
}

inline float half_value(uint16_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  const uint32_t base = ((h & 0x7FFFu) << 13) + ((127u - 15u) << 23);
  const uint32_t exp = shifted_exp & ((h & 0x7FFFu) << 13);
  const uint32_t special = base + ((128u - 16u) << 23);
  const float tiny = float_of(base + (1u << 23)) - float_of(113u << 23);
  const uint32_t o = exp == shifted_exp ? special : (exp == 0 ? bits_of(tiny) : base);
  return float_of(o | ((h & 0x8000u) << 16));
}

template <int NBITS>
inline uint32_t truncate_with(float x, uint32_t key) {
  // NBITS uniform bits added below the kept mantissa, then dropped (rounding.stochastic_round)
  const uint32_t bits = (key * 0x9E3779B1u) >> (32 - NBITS);
  return (bits_of(x) + bits) & ~((1u << NBITS) - 1u);
}

template <typename T>
struct Storage;  // T's bits as a number, an fp32 value stored in T, T's largest finite value

template <>
struct Storage<float> {
  using Bits = float;
  static constexpr float limit = std::numeric_limits<float>::max();
  static float load(float x) { return x; }
  static float store(float x, uint32_t) { return x; }
};

template <>
struct Storage<c10::Half> {
  using Bits = uint16_t;
  static constexpr float limit = 65504.0f;
  static float load(uint16_t h) { return half_value(h); }
  static uint16_t store(float x, uint32_t key) { return half_bits(float_of(truncate_with<13>(x, key))); }
};

template <>
struct Storage<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr float limit = 3.38953139e38f;
  static float load(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }
  // The truncated value is a bf16 exactly: its top half (a NaN stays a NaN, payload aside).
  static uint16_t store(float x, uint32_t key) {
    return static_cast<uint16_t>(truncate_with<16>(x, key) >> 16);
  }
};

struct Keys {  // the step's rounding keys of the weight and the momentum (rounding.step_key)
  uint32_t w0, w1, m0, m1;
  int64_t row_offset;
};

// Rows read from the window and written straight into the bank: w [R, D] (the window's fp32
// rows), g [R, D], coef [R], on [R] or one value; bank_w [N, D] and bank_m [N, D] (or empty) are
// updated at the distinct rows idx [R], in their storage dtypes: fp32 as is, fp16 and bf16
// stochastically rounded with rounding.py's bits (keys of the weight's and the momentum's
// stream, row_offset: the global id of local row 0). The fp32 values are checked against the
// largest finite value of their storage, as CenterBank._note does before a half store.
// One row of the scatter; returns how many new values are past their storage's range. Cloned
// for AVX2 (picked at load time where the CPU has it; FMA contraction stays off, so both clones
// compute the same bits): SSE2's integer ops make the half conversions the bottleneck.
template <typename TW, typename TM>
__attribute__((target_clones("avx2", "default"))) int32_t scatter_row(
    const float* wr, const float* gr, typename Storage<TW>::Bits* bw,
    typename Storage<TM>::Bits* bm, int64_t D, float t, const Factors& f, uint32_t wk,
    uint32_t mk, const uint32_t* CK) {
  int32_t bad = 0;
  if (bm != nullptr) {
#pragma omp simd reduction(+ : bad)
    for (int64_t d = 0; d < D; ++d) {
      const float w = wr[d];
      const float gi = gr[d] + w * t;
      const float mi = Storage<TM>::load(bm[d]) * f.mom + gi * f.inv;
      const float wi = w + mi * f.nlr;
      bad += (std::fabs(wi) <= Storage<TW>::limit ? 0 : 1) +
             (std::fabs(mi) <= Storage<TM>::limit ? 0 : 1);
      bm[d] = Storage<TM>::store(mi, mk ^ CK[d]);
      bw[d] = Storage<TW>::store(wi, wk ^ CK[d]);
    }
  } else {
    const float kk = f.nlr * f.inv;
#pragma omp simd reduction(+ : bad)
    for (int64_t d = 0; d < D; ++d) {
      const float w = wr[d];
      const float wi = w + (gr[d] + w * t) * kk;
      bad += std::fabs(wi) <= Storage<TW>::limit ? 0 : 1;
      bw[d] = Storage<TW>::store(wi, wk ^ CK[d]);
    }
  }
  return bad;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PFC_F16C 1

// Whether fp16 rows take the F16C path (where the CPU has it; tests turn it off to compare).
bool use_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");

// truncate_with<13>, then fp16 round-to-nearest-even: 8 values
__attribute__((target("avx2,f16c"))) inline __m128i round_f16c(__m256 x, __m256i key) {
  const __m256i mul = _mm256_set1_epi32(static_cast<int>(0x9E3779B1u));
  const __m256i keep = _mm256_set1_epi32(~((1 << 13) - 1));
  const __m256i bits = _mm256_srli_epi32(_mm256_mullo_epi32(key, mul), 32 - 13);
  const __m256i y = _mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(x), bits), keep);
  return _mm256_cvtps_ph(_mm256_castsi256_ps(y), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// How many of 8 values are past fp16's largest finite value (NaN compares false: counted).
__attribute__((target("avx2,f16c"))) inline int32_t out_of_range_f16c(__m256 x) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 le = _mm256_cmp_ps(_mm256_and_ps(x, absmask), _mm256_set1_ps(65504.0f), _CMP_LE_OQ);
  return __builtin_popcount(~_mm256_movemask_ps(le) & 0xFF);
}

// One fp16-weight row with F16C's conversions (one instruction per 8 values where the portable
// code above spends about twenty): the same arithmetic, the same bits. MomentumHalf: the
// momentum is fp16 too (else fp32).
template <bool MomentumHalf>
__attribute__((target("avx2,f16c"))) int32_t half_row_f16c(
    const float* wr, const float* gr, uint16_t* bw, void* bm_, int64_t D, float t,
    const Factors& f, uint32_t wk, uint32_t mk, const uint32_t* CK) {
  const __m256 vt = _mm256_set1_ps(t), vmom = _mm256_set1_ps(f.mom), vinv = _mm256_set1_ps(f.inv);
  const __m256 vnlr = _mm256_set1_ps(f.nlr);
  const __m256i vwk = _mm256_set1_epi32(static_cast<int>(wk));
  const __m256i vmk = _mm256_set1_epi32(static_cast<int>(mk));
  int32_t bad = 0;
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256i ck = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(CK + d));
    const __m256 w = _mm256_loadu_ps(wr + d);
    const __m256 gi = _mm256_add_ps(_mm256_loadu_ps(gr + d), _mm256_mul_ps(w, vt));
    __m256 m;
    if constexpr (MomentumHalf) {
      m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
          static_cast<uint16_t*>(bm_) + d)));
    } else {
      m = _mm256_loadu_ps(static_cast<float*>(bm_) + d);
    }
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(m, vmom), _mm256_mul_ps(gi, vinv));
    const __m256 wi = _mm256_add_ps(w, _mm256_mul_ps(mi, vnlr));
    bad += out_of_range_f16c(wi);
    if constexpr (MomentumHalf) {
      bad += out_of_range_f16c(mi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(bm_) + d),
                       round_f16c(mi, _mm256_xor_si256(vmk, ck)));
    } else {
      _mm256_storeu_ps(static_cast<float*>(bm_) + d, mi);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bw + d), round_f16c(wi, _mm256_xor_si256(vwk, ck)));
  }
  return bad;
}
#endif

template <typename TW, typename TM>
bool scatter_rows(typename Storage<TW>::Bits* BW, typename Storage<TM>::Bits* BM, const int64_t* I, int64_t N, const float* W, const float* G,
                  const float* C, const float* O, bool one, int64_t R, int64_t D,
                  const Factors& f, const Keys& k) {
  std::vector<uint32_t> cols(D);
  for (int64_t d = 0; d < D; ++d) cols[d] = column_key(d);
  const uint32_t* CK = cols.data();
#ifdef PFC_F16C
  const bool f16c = use_f16c;
#endif
  std::atomic<bool> finite{true};
  at::parallel_for(0, R, kGrain, [&](int64_t a, int64_t b) {
    int32_t bad = 0;
    for (int64_t i = a; i < b; ++i) {
      const float o = O[one ? 0 : i];
      if (o == 0.0f) continue;
      const int64_t r = I[i];
      TORCH_CHECK(r >= 0 && r < N, "row ", r, " outside the bank's ", N, " rows");
      const uint32_t wk = row_key(r + k.row_offset, k.w0, k.w1);
      const uint32_t mk = row_key(r + k.row_offset, k.m0, k.m1);
      const float t = C[i] + o * f.wds;
      const float* wr = W + i * D;
      const float* gr = G + i * D;
      auto* bw = BW + r * D;
      auto* bm = BM != nullptr ? BM + r * D : nullptr;
      int64_t done = 0;
#ifdef PFC_F16C
      if constexpr (std::is_same_v<TW, c10::Half>) {
        if (f16c && bm != nullptr) {
          done = D - D % 8;
          bad += half_row_f16c<std::is_same_v<TM, c10::Half>>(wr, gr, bw, bm, done, t, f, wk,
                                                              mk, CK);
        }
      }
#endif
      bad += scatter_row<TW, TM>(wr + done, gr + done, bw + done,
                                 bm != nullptr ? bm + done : nullptr, D - done, t, f, wk, mk,
                                 CK + done);
    }
    if (bad != 0) finite = false;
  });
  return finite.load();
}

}  // namespace

torch::Tensor sgd_scatter(torch::Tensor bank_w, torch::Tensor bank_m, torch::Tensor idx,
                          torch::Tensor w, torch::Tensor g, torch::Tensor coef, torch::Tensor on,
                          torch::Tensor scale, double lr, double momentum, double wd,
                          int64_t row_offset, std::vector<int64_t> keys) {
  const int64_t R = w.size(0), D = w.dim() == 2 ? w.size(1) : 0, N = bank_w.size(0);
  check_rows(w, R, D, "weight");
  check_rows(g, R, D, "grad");
  const auto wt = bank_w.scalar_type();
  TORCH_CHECK(bank_w.device().is_cpu() && bank_w.is_contiguous() && bank_w.dim() == 2 &&
                  bank_w.size(1) == D &&
                  (wt == torch::kFloat32 || wt == torch::kFloat16 || wt == torch::kBFloat16),
              "bank weight must be a contiguous CPU fp32/fp16/bf16 [N, ", D, "] tensor");
  const bool mom = bank_m.numel() > 0;
  const auto mt = mom ? bank_m.scalar_type() : wt;
  if (mom) {
    TORCH_CHECK(bank_m.device().is_cpu() && bank_m.is_contiguous() && bank_m.dim() == 2 &&
                    bank_m.size(0) == N && bank_m.size(1) == D &&
                    (mt == wt || mt == torch::kFloat32),
                "bank momentum must be a contiguous CPU tensor shaped as the bank weight, in "
                "its dtype or fp32");
  }
  check_vec(coef, R, "coef");
  check_vec(on, R, "on");
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == torch::kInt64 && idx.dim() == 1 &&
                  idx.is_contiguous() && idx.size(0) == R,
              "index must be a contiguous CPU int64 tensor of ", R, " rows");
  TORCH_CHECK(keys.size() == 4, "keys: the weight's and the momentum's two rounding keys");
  const Factors f = factors(lr, momentum, wd, scale);
  const Keys k{static_cast<uint32_t>(keys[0]), static_cast<uint32_t>(keys[1]),
               static_cast<uint32_t>(keys[2]), static_cast<uint32_t>(keys[3]), row_offset};
  const int64_t* I = idx.data_ptr<int64_t>();
  const float* W = w.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  const float* C = coef.data_ptr<float>();
  const float* O = on.data_ptr<float>();
  const bool one = on.numel() == 1 && R != 1;
  using Half = c10::Half;
  using BF16 = c10::BFloat16;
  auto* m32 = mom && mt == torch::kFloat32 ? bank_m.data_ptr<float>() : nullptr;
  auto* m16 = mom && mt != torch::kFloat32 ? reinterpret_cast<uint16_t*>(bank_m.data_ptr()) : nullptr;
  bool ok = true;
  if (wt == torch::kFloat32) {
    ok = scatter_rows<float, float>(bank_w.data_ptr<float>(), m32, I, N, W, G, C, O, one, R, D, f, k);
  } else {
    auto* w16 = reinterpret_cast<uint16_t*>(bank_w.data_ptr());
    const bool half = wt == torch::kFloat16;
    if (mom && mt == torch::kFloat32) {
      ok = half ? scatter_rows<Half, float>(w16, m32, I, N, W, G, C, O, one, R, D, f, k)
                : scatter_rows<BF16, float>(w16, m32, I, N, W, G, C, O, one, R, D, f, k);
    } else {
      ok = half ? scatter_rows<Half, Half>(w16, m16, I, N, W, G, C, O, one, R, D, f, k)
                : scatter_rows<BF16, BF16>(w16, m16, I, N, W, G, C, O, one, R, D, f, k);
    }
  }
  return torch::scalar_tensor(ok, torch::kBool);
}

// Turn the F16C path off or back on (where the CPU has it); returns whether it was on.
bool set_f16c(bool on) {
#ifdef PFC_F16C
  const bool was = use_f16c;
  use_f16c = on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return was;
#else
  (void)on;
  return false;
#endif
}

}  // namespace pfc_ds
