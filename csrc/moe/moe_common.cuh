// Device helpers shared by the fused_moe CUDA kernels: element conversion, activations, warp sums,
// 16-byte vector loads. Kernels work on CUDA's own element types (float, __half, __nv_bfloat16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "moe/moe_checks.h"

namespace moe_swap::moe_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// `activation` is a moe_swap::MoeActivation (moe_checks.h) as int: a runtime switch, uniform across the grid.
__device__ __forceinline__ float apply_activation(float g, int activation) {
  if (activation == static_cast<int>(MoeActivation::kSilu)) return g / (1.0f + expf(-g));
  if (activation == static_cast<int>(MoeActivation::kGelu)) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
  // tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
  return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Elements of T in one 16-byte load.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// One 16-byte load (p must be 16-byte aligned), widened to float.
template <typename T>
__device__ __forceinline__ void load_vec_as_float(const T* p, float (&f)[kVecElems<T>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) f[i] = to_float(elems[i]);
}

inline bool is_aligned_16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace moe_swap::moe_cuda
