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
// act(g) of the activations applied alone (ungated) or times up (gated); swiglu_clamp: see activate_pair.
__device__ __forceinline__ float apply_activation(float g, int activation) {
  if (activation == static_cast<int>(MoeActivation::kSilu)) return g / (1.0f + expf(-g));
  if (activation == static_cast<int>(MoeActivation::kGelu)) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
  if (activation == static_cast<int>(MoeActivation::kRelu2)) {
    const float r = g < 0.0f ? 0.0f : g;  // NaN stays NaN, as torch.relu
    return r * r;
  }
  // tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
  return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
}

// What the gate-up stage needs besides the projections: the activation and its parameters, and
// the optional w13 bias, indexed by the pair's global expert id (topk_ids before expert_map).
template <typename T>
struct MoeActArgs {
  int activation;          // MoeActivation
  bool gated;              // w13 rows: gate then up (2I), else up only (I)
  float swiglu_alpha;
  float swiglu_limit;
  const T* w13_bias;       // [E_global, w13_rows], or nullptr
  const int* global_ids;   // [T * k] int32 topk_ids, set when w13_bias is
  int w13_rows;
};

// The activated intermediate value at column n (of I) of pair `pair`'s expert, from its float32
// gate and up projections (gate unused when ungated): bias added in float32, then the activation.
template <typename T>
__device__ __forceinline__ float activate_pair(const MoeActArgs<T>& a, int pair, int n, int I, float gate, float up) {
  if (a.w13_bias != nullptr) {
    const T* bias = a.w13_bias + static_cast<int64_t>(a.global_ids[pair]) * a.w13_rows;
    if (a.gated) {
      gate += to_float(bias[n]);
      up += to_float(bias[I + n]);
    } else {
      up += to_float(bias[n]);
    }
  }
  if (!a.gated) return apply_activation(up, a.activation);
  if (a.activation == static_cast<int>(MoeActivation::kSwigluClamp)) {
    // gpt-oss: fminf/fmaxf would drop a NaN; these comparisons keep it, as torch.clamp does
    const float g = gate > a.swiglu_limit ? a.swiglu_limit : gate;
    const float u = up > a.swiglu_limit ? a.swiglu_limit : (up < -a.swiglu_limit ? -a.swiglu_limit : up);
    return (u + 1.0f) * (g / (1.0f + expf(-a.swiglu_alpha * g)));
  }
  if (a.activation == static_cast<int>(MoeActivation::kSiluClamp)) {  // DeepSeek-V4: the same clamps, silu(g) * u
    const float g = gate > a.swiglu_limit ? a.swiglu_limit : gate;
    const float u = up > a.swiglu_limit ? a.swiglu_limit : (up < -a.swiglu_limit ? -a.swiglu_limit : up);
    return (g / (1.0f + expf(-g))) * u;
  }
  return apply_activation(gate, a.activation) * up;
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
