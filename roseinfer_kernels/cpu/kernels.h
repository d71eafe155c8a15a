// The CPU kernels one C++ file may call from another (decode_layers.cpp runs the others in a loop).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace roseinfer_cpu {

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t n, bool q4_1);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rotary_write_kv(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor slot_mapping, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor seq_lens, double scale);

}  // namespace roseinfer_cpu
