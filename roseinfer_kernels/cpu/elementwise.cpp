// The CPU decode step's per-row elementwise work in one call each instead of several torch
// operations (whose dispatch, not their arithmetic, is what they cost at 576-wide rows):
//   add_rms_norm: h = x + residual, out = weight * (h / sqrt(mean(h^2) + eps)), in fp32 (HF's
//                 Llama RMSNorm, whose rounding to the model dtype is a no-op in fp32);
//   silu_mul:     silu(gate) * up over [gate | up] rows.
#include <torch/extension.h>

#include "kernels.h"
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

namespace roseinfer_cpu {

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "x must be [rows, n] float32");
  const int64_t rows = x.size(0), n = x.size(1);
  auto sum = residual.has_value() ? torch::empty_like(x, at::MemoryFormat::Contiguous) : x;
  auto out = torch::empty({rows, n}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const int64_t rstride = residual.has_value() ? residual->stride(0) : 0;
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sstride = sum.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * x.stride(0);
      float* h = sp + r * sstride;
      if (rp != nullptr) {
        const float* rr = rp + r * rstride;
        for (int64_t j = 0; j < n; ++j) h[j] = xr[j] + rr[j];
      }
      float squares = 0.f;
      for (int64_t j = 0; j < n; ++j) squares += h[j] * h[j];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
      float* o = op + r * n;
      for (int64_t j = 0; j < n; ++j) o[j] = w[j] * (h[j] * inv);
    }
  });
  return {out, sum};
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.dim() == 2 && gate_up.stride(1) == 1,
              "gate_up must be [rows, 2n] float32");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gp + r * gate_up.stride(0);
      const float* u = g + n;
      float* o = op + r * n;
      for (int64_t j = 0; j < n; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  });
  return out;
}

}  // namespace roseinfer_cpu

void register_elementwise(pybind11::module& m) {
  m.def("add_rms_norm", &roseinfer_cpu::add_rms_norm, "residual add + RMSNorm (fp32): (normed, sum)");
  m.def("silu_mul", &roseinfer_cpu::silu_mul, "silu(gate) * up over [gate | up] rows (fp32)");
}
