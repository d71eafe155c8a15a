// A Llama decode step's decoder layers in one call: per layer, residual add + RMSNorm, the qkv
// projection (GGUF blocks), RoPE + the cache write, paged decode attention, o_proj, add + RMSNorm,
// gate/up, SiLU * up and down_proj, each the kernel the Python path calls. For a 135M model the
// Python between those calls (module dispatch, views, argument checks) was about 1.8 of a
// step's 8.2 ms on 2 cores; here the loop costs nothing.
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

// Per layer: (input norm weight, qkv blocks, o blocks, post-attention norm weight, gate/up blocks,
// down blocks, KV cache [2, blocks, kv_heads, block_size, head_dim]); `q4_1`: each projection's
// scheme (qkv, o, gate_up, down), true for Q4_1, false for Q8_0. Returns (the last MLP's output,
// the residual stream), which the final norm takes, as LlamaForCausalLM.forward's loop returns.
std::tuple<torch::Tensor, torch::Tensor> decode_layers(
    torch::Tensor x, const std::vector<std::vector<torch::Tensor>>& layers, std::vector<bool> q4_1,
    torch::Tensor slot_mapping, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor block_tables, torch::Tensor seq_lens,
    int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale) {
  TORCH_CHECK(q4_1.size() == 4, "one scheme per projection: qkv, o, gate_up, down");
  const int64_t rows = x.size(0), hidden = x.size(1);
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  c10::optional<torch::Tensor> residual;
  for (const auto& layer : layers) {
    TORCH_CHECK(layer.size() == 7, "a layer is 7 tensors");
    const auto& kv = layer[6];
    auto normed = roseinfer_cpu::add_rms_norm(x, residual, layer[0], eps);
    residual = std::get<1>(normed);
    auto qkv = roseinfer_cpu::gguf_linear(std::get<0>(normed), layer[1], q_size + 2 * kv_size, q4_1[0]);
    auto q = qkv.narrow(1, 0, q_size).view({rows, heads, head_dim});
    auto k = qkv.narrow(1, q_size, kv_size).view({rows, kv_heads, head_dim});
    auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, kv_heads, head_dim});
    auto k_cache = kv.select(0, 0), v_cache = kv.select(0, 1);
    roseinfer_cpu::rotary_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin);
    auto attn = roseinfer_cpu::paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale);
    auto o = roseinfer_cpu::gguf_linear(attn.view({rows, q_size}), layer[2], hidden, q4_1[1]);
    normed = roseinfer_cpu::add_rms_norm(o, residual, layer[3], eps);
    residual = std::get<1>(normed);
    auto gate_up = roseinfer_cpu::gguf_linear(std::get<0>(normed), layer[4], 2 * intermediate, q4_1[2]);
    x = roseinfer_cpu::gguf_linear(roseinfer_cpu::silu_mul(gate_up), layer[5], hidden, q4_1[3]);
  }
  return {x, *residual};
}

}  // namespace

void register_decode_layers(pybind11::module& m) {
  m.def("decode_layers", &decode_layers, "a Llama decode step's decoder layers over GGUF blocks (fp32)");
}
