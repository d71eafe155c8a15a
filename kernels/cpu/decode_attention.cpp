// The CPU decode step's attention work in two calls instead of about thirty torch operations a
// layer (each a few microseconds of dispatch, which at 135M parameters is most of a step):
//   rotary_write_kv: RoPE (HF's rotate-half form) on the query and key heads in place, then the
//                    rotated keys and the values stored into the paged cache at their slots;
//   paged_decode:    one query token per sequence against its cached K/V through the block
//                    table, online softmax in fp32, GQA (a KV head serves its group of query
//                    heads), no gather of the context.
// fp32 tensors; the cache is [blocks, kv_heads, block_size, head_dim] per half, as on CUDA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

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
  const int64_t table_width = block_tables.stride(0);
  const bool wide = block_tables.scalar_type() == torch::kInt64;
  TORCH_CHECK(wide || block_tables.scalar_type() == torch::kInt32, "block tables must be int32/int64");
  const void* tdata = block_tables.data_ptr();
  auto tp = [&](int64_t i) -> int64_t {
    return wide ? static_cast<const int64_t*>(tdata)[i] : static_cast<const int32_t*>(tdata)[i];
  };
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * dim), m(group), l(group), qs(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kv_heads, kh = task % kv_heads, len = lp[s];
      for (int64_t g = 0; g < group; ++g) {
        const float* qh = q.data_ptr<float>() + s * q.stride(0) + (kh * group + g) * q.stride(1);
        for (int64_t d = 0; d < dim; ++d) qs[g * dim + d] = qh[d] * fscale;
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t block = tp(s * table_width + pos / block_size);
        const int64_t base = ((block * kv_heads + kh) * block_size + pos % block_size) * dim;
        const float *key = kc + base, *value = vc + base;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qs.data() + g * dim;
          float score = 0.f;
          for (int64_t d = 0; d < dim; ++d) score += qg[d] * key[d];
          float* a = acc.data() + g * dim;
          if (score > m[g]) {  // rescale what has been summed so far to the new maximum
            const float alpha = std::exp(m[g] - score);
            l[g] *= alpha;
            for (int64_t d = 0; d < dim; ++d) a[d] *= alpha;
            m[g] = score;
          }
          const float p = std::exp(score - m[g]);
          l[g] += p;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out.data_ptr<float>() + s * heads * dim + (kh * group + g) * dim;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;  // a padding row (length 0) gives zeros
        for (int64_t d = 0; d < dim; ++d) o[d] = acc[g * dim + d] * inv;
      }
    }
  });
  return out;
}

}  // namespace

void register_decode_attention(pybind11::module& m) {
  m.def("rotary_write_kv", &rotary_write_kv, "RoPE on q and k in place, then k and v into the paged cache");
  m.def("paged_decode", &paged_decode, "one query token per sequence over the paged cache (fp32)");
}
