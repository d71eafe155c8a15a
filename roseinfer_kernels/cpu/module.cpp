// The CPU kernels as one Python extension module (built by roseinfer_kernels/cpu_build.py).
#include <torch/extension.h>

void register_gguf_gemm(pybind11::module& m);
void register_decode_attention(pybind11::module& m);
void register_elementwise(pybind11::module& m);
void register_decode_layers(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_gguf_gemm(m);
  register_decode_attention(m);
  register_elementwise(m);
  register_decode_layers(m);
}
