#include "core/checks.h"

#include <atomic>
#include <cstdlib>
#include <sstream>

#ifdef MOE_SWAP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace moe_swap {

namespace {
std::atomic<bool>& debug_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("MOE_SWAP_DEBUG");
    return env != nullptr && env[0] != '\0' && std::string(env) != "0";
  }()};
  return flag;
}
}  // namespace

bool debug_enabled() { return debug_flag().load(std::memory_order_relaxed); }

void set_debug(bool enabled) { debug_flag().store(enabled, std::memory_order_relaxed); }

#ifdef MOE_SWAP_WITH_CUDA
bool debug_sync_now() {
  if (!debug_enabled()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status == cudaStreamCaptureStatusNone;
}
#endif

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace moe_swap
