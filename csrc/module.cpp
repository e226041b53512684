// The Python module lotus_kernels._C. Loading it registers the ops (their
// TORCH_LIBRARY blocks run at load time); the module itself only reports how
// it was built, for `python -m lotus_kernels.info` and the "not built" errors.
#include <torch/extension.h>

#ifdef LOTUS_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#ifndef LOTUS_CUDA_ARCH_LIST
#define LOTUS_CUDA_ARCH_LIST ""
#endif
#ifndef LOTUS_TORCH_VERSION
#define LOTUS_TORCH_VERSION ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef LOTUS_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string((CUDART_VERSION % 1000) / 10);
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
#endif
    info["cuda_arch_list"] = std::string(LOTUS_CUDA_ARCH_LIST);
    info["torch_version"] = std::string(LOTUS_TORCH_VERSION);
    return info;
  });
}
