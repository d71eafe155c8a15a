// y = x @ W^T for W kept in GGUF's Q4_1 or Q8_0 blocks, on the CPU, with fp32 activations.
//
// Decode reads every weight once per step, so on a CPU the step time is the bytes of the weights
// over the memory bandwidth: 4.5-bit Q4_1 blocks are 1/7 of fp32. The blocks are used as they are
// in the file: each is decoded in registers to exactly the fp32 weights HF dequantises (Q4_1:
// d q + m; Q8_0: d q), then multiplied into the rows of x with fp32 fused multiply-adds. Rows of
// x are processed together (up to kMaxRows), sharing each block's decoded weights. Work is split
// over output rows with torch's intra-op thread pool.
#include <torch/extension.h>

#include "kernels.h"
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ROSEINFER_AVX2 1
#endif

namespace roseinfer_cpu {

constexpr int kBlock = 32;
constexpr int kQ41Bytes = 20;  // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int kQ80Bytes = 34;  // fp16 d, 32 int8
constexpr int kMaxRows = 8;

inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf/nan).
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

#if defined(__AVX512F__)
// One block's 32 weights as two vectors of 16, exactly as HF dequantises them (d q + m, or d q:
// d q is exact in fp32, so the fused multiply-add rounds once, like the separate add).
inline void block_weights(const uint8_t* blk, bool q4_1, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
  if (q4_1) {
    const __m512 m = _mm512_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m128i mask = _mm_set1_epi8(0x0f);
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), d, m);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), d, m);
  } else {
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)))), d);
  }
}
#endif

#if defined(ROSEINFER_AVX2)
// AVX2 machines (no AVX-512): one block's 32 weights as four vectors of 8, exactly as above.
// Without this path they took the scalar loop, and the blocks measured 0.3x dense float32 there.
inline void block_weights_avx2(const uint8_t* blk, bool q4_1, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
  if (q4_1) {
    const __m256 m = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), d);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), d);
  }
}

inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#endif

// One block's 32 weights into out[0..31] (the portable path and the dequantiser).
inline void block_weights_scalar(const uint8_t* blk, bool q4_1, float* out) {
  const float d = half_to_float(load_u16(blk));
  if (q4_1) {
    const float m = half_to_float(load_u16(blk + 2));
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(blk[4 + j] & 0x0f) + m;
      out[j + 16] = d * static_cast<float>(blk[4 + j] >> 4) + m;
    }
  } else {
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
  }
}

// y[r, o] = sum_k x[r, k] w[o, k] for `rows` <= kMaxRows rows of x; each block's weights are
// decoded once and used by every row, each row keeps two independent accumulator chains.
// (Computing several output rows together, to load each x vector once for all of them, measured
// slower here: 7.1 against 4.5 ms for SmolLM2's layers at one row.)
template <int kRows>
void gemm_rows(const float* x, int64_t k, const uint8_t* w, int64_t n, bool q4_1, float* y) {
  const int64_t blocks = k / kBlock;
  const int64_t block_bytes = q4_1 ? kQ41Bytes : kQ80Bytes;
  const int64_t row_bytes = blocks * block_bytes;
  // A few output rows per task: each task streams its own slice of the weights.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* row = w + o * row_bytes;
#if defined(__AVX512F__)
      __m512 acc_lo[kRows], acc_hi[kRows];
      for (int r = 0; r < kRows; ++r) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        __m512 lo, hi;
        block_weights(row + b * block_bytes, q4_1, lo, hi);
        const float* xb = x + b * kBlock;
        for (int r = 0; r < kRows; ++r) {
          acc_lo[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k), lo, acc_lo[r]);
          acc_hi[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k + 16), hi, acc_hi[r]);
        }
      }
      for (int r = 0; r < kRows; ++r) y[r * n + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
#elif defined(ROSEINFER_AVX2)
      // Independent accumulator chains per row, as many as the 16 vector registers allow next to
      // the block's four weight vectors (one row alone would wait on each FMA's latency).
      constexpr int kAcc = kRows == 1 ? 4 : (kRows <= 2 ? 2 : 1);
      __m256 acc[kRows][kAcc];
      for (int r = 0; r < kRows; ++r)
        for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        __m256 w8[4];
        block_weights_avx2(row + b * block_bytes, q4_1, w8);
        const float* xb = x + b * kBlock;
        for (int r = 0; r < kRows; ++r)
          for (int j = 0; j < 4; ++j)
            acc[r][j % kAcc] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + r * k + 8 * j), w8[j], acc[r][j % kAcc]);
      }
      for (int r = 0; r < kRows; ++r) {
        __m256 sum = acc[r][0];
        for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
        y[r * n + o] = hsum_avx2(sum);
      }
#else
      float acc[kRows] = {0.f};
      float wts[kBlock];
      for (int64_t b = 0; b < blocks; ++b) {
        block_weights_scalar(row + b * block_bytes, q4_1, wts);
        for (int r = 0; r < kRows; ++r)
          for (int j = 0; j < kBlock; ++j) acc[r] += x[r * k + b * kBlock + j] * wts[j];
      }
      for (int r = 0; r < kRows; ++r) y[r * n + o] = acc[r];
#endif
    }
  });
}

using GemmFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, bool, float*);
constexpr GemmFn kGemm[kMaxRows + 1] = {nullptr, gemm_rows<1>, gemm_rows<2>, gemm_rows<3>, gemm_rows<4>,
                                        gemm_rows<5>, gemm_rows<6>, gemm_rows<7>, gemm_rows<8>};

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t n, bool q4_1) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [rows, k] float32");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.size(0) == n,
              "weight must be [n, blocks * block bytes] uint8");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, "k must be a multiple of 32");
  TORCH_CHECK(weight.size(1) == k / kBlock * (q4_1 ? kQ41Bytes : kQ80Bytes), "weight row size does not match k");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t rows = x.size(0);
  auto y = torch::empty({rows, n}, x.options());
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t r = std::min<int64_t>(kMaxRows, rows - r0);
    kGemm[r](x.data_ptr<float>() + r0 * k, k, weight.data_ptr<uint8_t>(), n, q4_1, y.data_ptr<float>() + r0 * n);
  }
  return y;
}

// The weights as fp32 [n, k] (prefill of many tokens: dequantise, then one sgemm).
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t k, bool q4_1) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2, "weight must be uint8 blocks");
  weight = weight.contiguous();
  const int64_t n = weight.size(0), blocks = k / kBlock;
  auto out = torch::empty({n, k}, torch::dtype(torch::kFloat32));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t row_bytes = blocks * (q4_1 ? kQ41Bytes : kQ80Bytes);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        block_weights_scalar(w + r * row_bytes + b * (q4_1 ? kQ41Bytes : kQ80Bytes), q4_1, o + r * k + b * kBlock);
  });
  return out;
}

}  // namespace roseinfer_cpu

void register_gguf_gemm(pybind11::module& m) {
  m.def("gguf_linear", &roseinfer_cpu::gguf_linear, "x @ W^T with W in Q4_1 or Q8_0 blocks (fp32 x)");
  m.def("gguf_dequantize", &roseinfer_cpu::gguf_dequantize, "Q4_1 or Q8_0 blocks to fp32");
}
