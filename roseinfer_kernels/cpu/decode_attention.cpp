// The CPU decode step's attention work in two calls instead of about thirty torch operations a
// layer (each a few microseconds of dispatch, which at 135M parameters is most of a step):
//   rotary_write_kv: RoPE (HF's rotate-half form) on the query and key heads in place, then the
//                    rotated keys and the values stored into the paged cache at their slots;
//   paged_decode:    one query token per sequence against its cached K/V through the block
//                    table, online softmax in fp32, GQA (a KV head serves its group of query
//                    heads), no gather of the context.
// fp32 tensors; the cache is [blocks, kv_heads, block_size, head_dim] per half, as on CUDA.
#include <torch/extension.h>

#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace roseinfer_cpu {

// Reads int32 or int64 index tensors alike (the runner keeps slots int64, block tables int32),
// without a converting copy per call.
struct Indices {
  const void* data;
  bool wide;
  explicit Indices(const torch::Tensor& t) : data(t.data_ptr()), wide(t.scalar_type() == torch::kInt64) {
    TORCH_CHECK(t.is_contiguous() && (wide || t.scalar_type() == torch::kInt32), "indices must be contiguous int32/int64");
  }
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }
};

void rotary_write_kv(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor slot_mapping, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "caches and tables must be contiguous");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1), half = dim / 2;
  const int64_t block_size = k_cache.size(2);
  const Indices posp(positions), slotp(slot_mapping);
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + posp[t] * half;
      const float* s = sp + posp[t] * half;
      auto rotate = [&](float* x) {
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = x[j], x2 = x[j + half];
          x[j] = x1 * c[j] - x2 * s[j];
          x[j + half] = x2 * c[j] + x1 * s[j];
        }
      };
      for (int64_t h = 0; h < heads; ++h) rotate(qp + t * q.stride(0) + h * q.stride(1));
      for (int64_t h = 0; h < kv_heads; ++h) rotate(kp + t * k.stride(0) + h * k.stride(1));
      const int64_t slot = slotp[t];
      if (slot < 0) continue;  // padding
      const int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t dst = ((block * kv_heads + h) * block_size + offset) * dim;
        std::copy_n(kp + t * k.stride(0) + h * k.stride(1), dim, kc + dst);
        std::copy_n(vp + t * v.stride(0) + h * v.stride(1), dim, vc + dst);
      }
    }
  });
}

// Dot product in 16 independent partial sums: a loop the compiler turns into one vector FMA per
// 16 elements (a single running sum is a chain it must not reorder, so it stays scalar).
inline float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[d + j] * b[d + j];
  float sum = 0.f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (int j = 0; j < 16; ++j) sum += part[j];
  return sum;
}

// One KV head's group of query heads (qs: [group, dim], pre-scaled) over `len` tokens of a context
// whose token i sits at offset rows[i] of both caches. Two passes: every score (each key read
// once for the whole group), exponentiated against the running maximum, then the values weighted
// by them. Unnormalised, so that parts of one context merge: per head the maximum m[g], the sum
// of the exponentials l[g] and acc [group, dim] = sum of exp(score - m) * value. `scores` is
// scratch of group * len floats.
void attend_portable(const float* qs, const int64_t* rows, const float* kc, const float* vc, int64_t group,
                     int64_t dim, int64_t len, float* scores, float* acc, float* m, float* l) {
  for (int64_t pos = 0; pos < len; ++pos)
    for (int64_t g = 0; g < group; ++g) scores[g * len + pos] = dot(qs + g * dim, kc + rows[pos], dim);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    m[g] = -std::numeric_limits<float>::infinity();
    for (int64_t pos = 0; pos < len; ++pos) m[g] = std::max(m[g], sg[pos]);
    l[g] = 0.f;
    for (int64_t pos = 0; pos < len; ++pos) {
      sg[pos] = std::exp(sg[pos] - m[g]);
      l[g] += sg[pos];
    }
  }
  std::fill_n(acc, group * dim, 0.f);
  for (int64_t pos = 0; pos < len; ++pos) {
    const float* value = vc + rows[pos];
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + pos];
      float* a = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
    }
  }
}

#if defined(__AVX512F__)
// exp(x) for 16 floats (Cephes' expf: x = n ln2 + r, exp(r) by a polynomial, times 2^n), about
// 1e-7 relative error; std::exp is scalar.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// x[i] = exp(x[i] - max), 16 lanes at a time; returns the max, *sum gets the sum.
inline float exp_against_max(float* x, int64_t n, float* sum_out) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, x + i));
  }
  const float mx = _mm512_reduce_max_ps(m);
  const __m512 mv = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  *sum_out = _mm512_reduce_add_ps(sum);
  return mx;
}

constexpr int64_t kMaxVectors = 32;  // group x head_dim / 16: the queries and accumulators held in registers
constexpr int64_t kPrefetch = 8;     // rows ahead: the cache is streamed from memory, a row per token

// Token `pos`'s row of a cache (nv vectors of 16) into xv, and the row kPrefetch tokens on asked for.
inline void load_row(const float* cache, const int64_t* rows, int64_t pos, int64_t len, int64_t nv, __m512* xv) {
  if (pos + kPrefetch < len)
    for (int64_t b = 0; b < nv * 64; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(cache + rows[pos + kPrefetch]) + b, _MM_HINT_T0);
  const float* row = cache + rows[pos];
  for (int64_t v = 0; v < nv; ++v) xv[v] = _mm512_loadu_ps(row + v * 16);
}

// attend_portable's arithmetic in AVX-512 registers: head_dim a multiple of 16, a group of at
// most kMaxVectors * 16 / head_dim query heads (SmolLM2's 3 x 64, Llama-3's 4 x 128).
void attend_avx512(const float* qs, const int64_t* rows, const float* kc, const float* vc, int64_t group,
                   int64_t dim, int64_t len, float* scores, float* acc, float* m, float* l) {
  const int64_t nv = dim / 16;
  __m512 qv[kMaxVectors], xv[kMaxVectors], av[kMaxVectors];
  for (int64_t i = 0; i < group * nv; ++i) qv[i] = _mm512_loadu_ps(qs + i * 16);
  for (int64_t pos = 0; pos < len; ++pos) {
    load_row(kc, rows, pos, len, nv, xv);
    for (int64_t g = 0; g < group; ++g) {
      __m512 sum = _mm512_mul_ps(qv[g * nv], xv[0]);
      for (int64_t v = 1; v < nv; ++v) sum = _mm512_fmadd_ps(qv[g * nv + v], xv[v], sum);
      scores[g * len + pos] = _mm512_reduce_add_ps(sum);
    }
  }
  for (int64_t g = 0; g < group; ++g) m[g] = exp_against_max(scores + g * len, len, l + g);
  for (int64_t i = 0; i < group * nv; ++i) av[i] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < len; ++pos) {
    load_row(vc, rows, pos, len, nv, xv);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * len + pos]);
      for (int64_t v = 0; v < nv; ++v) av[g * nv + v] = _mm512_fmadd_ps(p, xv[v], av[g * nv + v]);
    }
  }
  for (int64_t i = 0; i < group * nv; ++i) _mm512_storeu_ps(acc + i * 16, av[i]);
}
#endif

constexpr int64_t kMinSplitTokens = 128;  // a context part worth a task of its own

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be float32 with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2), group = heads / kv_heads;
  TORCH_CHECK(block_tables.stride(1) == 1, "block table rows must be contiguous");
  auto out = torch::empty({seqs, heads, dim}, q.options());
  const float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const Indices lp(seq_lens);
  const int64_t table_width = block_tables.stride(0);  // rows may be views of a wider table
  const bool wide = block_tables.scalar_type() == torch::kInt64;
  TORCH_CHECK(wide || block_tables.scalar_type() == torch::kInt32, "block tables must be int32/int64");
  const void* tdata = block_tables.data_ptr();
  auto table = [&](int64_t i) -> int64_t {
    return wide ? static_cast<const int64_t*>(tdata)[i] : static_cast<const int32_t*>(tdata)[i];
  };
  const float fscale = static_cast<float>(scale);
  auto attend = attend_portable;
#if defined(__AVX512F__)
  if (dim % 16 == 0 && group * (dim / 16) <= kMaxVectors) attend = attend_avx512;
#endif
  // Tasks: (sequence, KV head, part of the context). A small batch has fewer (sequence, KV head)
  // pairs than threads can share evenly (SmolLM2 alone: 3 on 2 cores), so long contexts are cut
  // into parts, merged below from their maxima and sums (flash-decoding's split).
  int64_t max_len = 0;
  for (int64_t s = 0; s < seqs; ++s) max_len = std::max(max_len, lp[s]);
  const int64_t pairs = seqs * kv_heads;
  const int64_t wanted = (4 * at::get_num_threads() + pairs - 1) / pairs;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, max_len / kMinSplitTokens));
  std::vector<float> part_acc(pairs * splits * group * dim), part_m(pairs * splits * group), part_l(pairs * splits * group);
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(group * dim), scores;
    std::vector<int64_t> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / splits, split = task % splits;
      const int64_t s = pair / kv_heads, kh = pair % kv_heads, len = lp[s];
      const int64_t chunk = (len + splits - 1) / splits;
      const int64_t first = std::min(len, split * chunk), count = std::min(len, first + chunk) - first;
      float *acc = part_acc.data() + task * group * dim, *m = part_m.data() + task * group, *l = part_l.data() + task * group;
      if (count == 0) {  // nothing here (a padding row, or a short context's empty part): weighs nothing
        std::fill_n(m, group, -std::numeric_limits<float>::infinity());
        std::fill_n(l, group, 0.f);
        std::fill_n(acc, group * dim, 0.f);
        continue;
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* qh = q.data_ptr<float>() + s * q.stride(0) + (kh * group + g) * q.stride(1);
        for (int64_t d = 0; d < dim; ++d) qs[g * dim + d] = qh[d] * fscale;
      }
      rows.resize(count);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t pos = first + i;
        rows[i] = ((table(s * table_width + pos / block_size) * kv_heads + kh) * block_size + pos % block_size) * dim;
      }
      scores.resize(group * count);
      attend(qs.data(), rows.data(), kc, vc, group, dim, count, scores.data(), acc, m, l);
    }
  });
  at::parallel_for(0, pairs * group, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // one query head: its parts merged
      const int64_t pair = row / group, g = row % group;
      const int64_t s = pair / kv_heads, kh = pair % kv_heads;
      float* o = out.data_ptr<float>() + s * heads * dim + (kh * group + g) * dim;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t k = 0; k < splits; ++k) mx = std::max(mx, part_m[(pair * splits + k) * group + g]);
      std::fill_n(o, dim, 0.f);
      if (mx == -std::numeric_limits<float>::infinity()) continue;  // a padding row gives zeros
      float total = 0.f;
      for (int64_t k = 0; k < splits; ++k) {
        const int64_t part = (pair * splits + k) * group + g;
        if (part_l[part] == 0.f) continue;
        const float w = std::exp(part_m[part] - mx);
        total += w * part_l[part];
        const float* a = part_acc.data() + part * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
    }
  });
  return out;
}

}  // namespace roseinfer_cpu

void register_decode_attention(pybind11::module& m) {
  m.def("rotary_write_kv", &roseinfer_cpu::rotary_write_kv, "RoPE on q and k in place, then k and v into the paged cache");
  m.def("paged_decode", &roseinfer_cpu::paged_decode, "one query token per sequence over the paged cache (fp32)");
}
