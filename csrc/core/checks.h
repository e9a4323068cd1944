// Input contracts and error checking shared by every entry point.
//
// Every CUDA entry point does the same four things, in order: check its inputs with the macros
// below (messages name the argument, what was expected and what came), put an OptionalCUDAGuard on
// the input's device, launch on at::cuda::getCurrentCUDAStream(), then MOE_SWAP_LAUNCH_CHECK().
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace moe_swap {

// The debug switch: MOE_SWAP_DEBUG=1 in the environment (read once), or set_debug(true) from
// Python through torch.ops.moe_swap.set_debug. When on, every CUDA launch is followed by a
// synchronise and an error check (so a fault names the kernel that caused it), and CUDA kernels
// that otherwise skip invalid data (an out-of-range expert id) report it as an error instead.
bool debug_enabled();
void set_debug(bool enabled);

// "[3, 4]"-style rendering for messages.
std::string shape_str(const at::Tensor& t);

}  // namespace moe_swap

#define MOE_SWAP_CHECK_DIM(x, n)                                                                \
  TORCH_CHECK((x).dim() == (n), #x " must be a ", n, "-D tensor, got ", (x).dim(), "-D with shape ", \
              ::moe_swap::shape_str(x))

#define MOE_SWAP_CHECK_SIZE(x, d, expected, what)                                               \
  TORCH_CHECK((x).size(d) == (expected), #x ".size(" #d ") must equal " what " = ", (expected),  \
              ", got ", (x).size(d), " (" #x " shape ", ::moe_swap::shape_str(x), ")")

#define MOE_SWAP_CHECK_DTYPE(x, dtype)                                                          \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())

#define MOE_SWAP_CHECK_SAME_DTYPE(x, y)                                                         \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype, got ", \
              (x).scalar_type(), " and ", (y).scalar_type())

#define MOE_SWAP_CHECK_SAME_DEVICE(x, y)                                                        \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ",    \
              (x).device(), " and ", (y).device())

#define MOE_SWAP_CHECK_FLOATING(x)                                                              \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||          \
                  (x).scalar_type() == at::kHalf,                                               \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())

#ifdef MOE_SWAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>

namespace moe_swap {
// Debug mode's checks that wait for the device: on when the debug switch is, except while the
// current CUDA stream is capturing a graph (a synchronisation there is illegal and would invalidate
// the capture; launch errors are still checked).
bool debug_sync_now();
}  // namespace moe_swap

// After every kernel launch: the launch error now, and in debug mode the kernel's own error too.
#define MOE_SWAP_LAUNCH_CHECK()                                                                 \
  do {                                                                                          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                             \
    if (::moe_swap::debug_sync_now()) {                                                         \
      C10_CUDA_CHECK(cudaDeviceSynchronize());                                                  \
    }                                                                                           \
  } while (0)
#endif
