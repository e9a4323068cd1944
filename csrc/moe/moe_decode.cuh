// fused_moe's few-token (decode) path: each selected expert's weights are read once.
// grid: (expert slot in the active-expert list, block of 8 weight rows); one warp per weight row,
// which it streams once per group of up to 8 of the expert's tokens (one group at decode sizes),
// dotting it with every token of the group at the same time (the token vectors are small and stay
// in L1/L2). 16-byte loads when the row length is a multiple of 8 (fp16/bf16) or 4 (fp32) and the
// operands are aligned, scalar loads otherwise.
#pragma once

#include "moe_common.cuh"

namespace moe_swap::moe_cuda {

constexpr int kDecodeWarps = 8;          // weight rows per block
constexpr int kDecodeTokens = 8;         // tokens sharing one pass over a weight row
constexpr int kDecodeMaxPairs = 64;      // T * k up to this takes the decode path

// acc[i] += dot(w_row, x_rows[i]) over this lane's share of the K elements, for tokens i < count.
template <typename T, int kRowsOfW>
__device__ __forceinline__ void decode_dot_rows(const T* const (&w_rows)[kRowsOfW], const T* const (&x_rows)[kDecodeTokens],
                                                int count, int K, bool vec_ok,
                                                float (&acc)[kRowsOfW][kDecodeTokens]) {
  const int lane = threadIdx.x & 31;
  constexpr int kVec = kVecElems<T>;
  const int vec_end = vec_ok ? (K / kVec) * kVec : 0;
  for (int k = lane * kVec; k < vec_end; k += 32 * kVec) {
    float w[kRowsOfW][kVec];
#pragma unroll
    for (int r = 0; r < kRowsOfW; ++r) load_vec_as_float(w_rows[r] + k, w[r]);
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) {
      if (i < count) {
        float x[kVec];
        load_vec_as_float(x_rows[i] + k, x);
#pragma unroll
        for (int r = 0; r < kRowsOfW; ++r)
#pragma unroll
          for (int v = 0; v < kVec; ++v) acc[r][i] += w[r][v] * x[v];
      }
    }
  }
  for (int k = vec_end + lane; k < K; k += 32) {
    float w[kRowsOfW];
#pragma unroll
    for (int r = 0; r < kRowsOfW; ++r) w[r] = to_float(w_rows[r][k]);
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) {
      if (i < count) {
        const float x = to_float(x_rows[i][k]);
#pragma unroll
        for (int r = 0; r < kRowsOfW; ++r) acc[r][i] += w[r] * x;
      }
    }
  }
}

// intermediate[row, n] = act(w13[e, n] . x_t + b) * (w13[e, I + n] . x_t + b), or act(w13[e, n] . x_t + b)
// when ungated (activate_pair), rounded to T, for every sorted row of expert e (t = sorted_pairs[row] / topk).
template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    moe_decode_gate_up_kernel(const T* __restrict__ hidden_states, const T* __restrict__ w13,
                              const int* __restrict__ active_experts, const int* __restrict__ expert_offsets,
                              const int* __restrict__ sorted_pairs, int topk, int H, int I, MoeActArgs<T> act,
                              bool vec_ok, T* __restrict__ intermediate) {
  const int expert = active_experts[blockIdx.x];
  const int n = static_cast<int>(blockIdx.y) * kDecodeWarps + static_cast<int>(threadIdx.x / 32);
  if (expert < 0 || n >= I) return;  // no block-wide barrier below: warps may leave on their own
  const int lane = threadIdx.x & 31;
  const T* w_expert = w13 + static_cast<int64_t>(expert) * act.w13_rows * H;
  const T* const w_rows[2] = {w_expert + static_cast<int64_t>(n) * H, w_expert + static_cast<int64_t>(I + n) * H};
  const T* const up_row[1] = {w_expert + static_cast<int64_t>(n) * H};  // ungated: the up rows come first
  const int row_end = expert_offsets[expert + 1];
  for (int row0 = expert_offsets[expert]; row0 < row_end; row0 += kDecodeTokens) {
    const int count = min(kDecodeTokens, row_end - row0);
    const T* x_rows[kDecodeTokens];
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) {
      x_rows[i] = hidden_states + static_cast<int64_t>(sorted_pairs[row0 + min(i, count - 1)] / topk) * H;
    }
    float acc[2][kDecodeTokens] = {};  // gate, up
    if (act.gated) {
      decode_dot_rows<T, 2>(w_rows, x_rows, count, H, vec_ok, acc);
    } else {
      float up_acc[1][kDecodeTokens] = {};
      decode_dot_rows<T, 1>(up_row, x_rows, count, H, vec_ok, up_acc);
#pragma unroll
      for (int i = 0; i < kDecodeTokens; ++i) acc[1][i] = up_acc[0][i];
    }
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) {
      if (i < count) {
        const float gate = warp_sum(acc[0][i]);
        const float up = warp_sum(acc[1][i]);
        if (lane == 0) {
          const int row = row0 + i;
          intermediate[static_cast<int64_t>(row) * I + n] = from_float<T>(activate_pair(act, sorted_pairs[row], n, I, gate, up));
        }
      }
    }
  }
}

// expert_out[row, n] = w2[e, n] . intermediate[row] in float32, for every sorted row of expert e.
template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    moe_decode_down_kernel(const T* __restrict__ intermediate, const T* __restrict__ w2,
                           const int* __restrict__ active_experts, const int* __restrict__ expert_offsets, int H,
                           int I, bool vec_ok, float* __restrict__ expert_out) {
  const int expert = active_experts[blockIdx.x];
  const int n = static_cast<int>(blockIdx.y) * kDecodeWarps + static_cast<int>(threadIdx.x / 32);
  if (expert < 0 || n >= H) return;
  const int lane = threadIdx.x & 31;
  const T* const w_rows[1] = {w2 + (static_cast<int64_t>(expert) * H + n) * I};
  const int row_end = expert_offsets[expert + 1];
  for (int row0 = expert_offsets[expert]; row0 < row_end; row0 += kDecodeTokens) {
    const int count = min(kDecodeTokens, row_end - row0);
    const T* x_rows[kDecodeTokens];
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) x_rows[i] = intermediate + static_cast<int64_t>(row0 + min(i, count - 1)) * I;
    float acc[1][kDecodeTokens] = {};
    decode_dot_rows<T, 1>(w_rows, x_rows, count, I, vec_ok, acc);
#pragma unroll
    for (int i = 0; i < kDecodeTokens; ++i) {
      if (i < count) {
        const float sum = warp_sum(acc[0][i]);
        if (lane == 0) expert_out[static_cast<int64_t>(row0 + i) * H + n] = sum;
      }
    }
  }
}

}  // namespace moe_swap::moe_cuda
