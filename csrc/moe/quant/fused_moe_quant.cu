// fused_moe_quant on CUDA: the pairs sorted by expert on the device (moe_sort.cuh, as fused_moe), then per
// selected expert one warp per weight row, which decodes its quantized bytes in registers (8 consecutive
// weights per lane and step, one scale per step) and dots them with up to 8 of the expert's tokens at once,
// so at decode sizes each selected expert's bytes are read once; then the weighted combine per token.
// Correctness first: no tensor cores yet (prefill re-reads the weights once per 8 tokens of an expert).
// Compiled for sm_90 on a machine without a GPU: it has never run.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "core/checks.h"
#include "moe/moe_common.cuh"
#include "moe/moe_sort.cuh"
#include "moe/quant/quant_checks.h"
#include "ops.h"

namespace moe_swap {
namespace {

using namespace moe_cuda;

constexpr int kQuantWarps = 8;   // weight rows per block
constexpr int kQuantTokens = 8;  // tokens sharing one pass over a weight row
constexpr int kChunk = 8;        // consecutive weights one lane decodes per step

// One projection [E, rows, cols], quantized (layouts: moe_swap/quant.py).
struct QuantMatrixDev {
  const uint8_t* q;
  const void* scale;
  const uint8_t* zero;  // int4 only, or nullptr (zero point 8)
  int64_t expert_q_bytes;
  int64_t expert_scales;  // scale (and zero) elements per expert
  int row_bytes;
  int scale_ld;
  int group;
  int cols;
  int seg_rows;    // fp8: rows per segment
  int seg_blocks;  // fp8: row blocks per segment
};

__device__ __forceinline__ float scale_to_float(float v) { return v; }
__device__ __forceinline__ float scale_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float scale_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float e8m0_to_float(uint8_t e) {
  if (e == 255) return __int_as_float(0x7FC00000);
  return e == 0 ? __int_as_float(0x00400000) : __int_as_float(static_cast<int>(e) << 23);
}

__device__ __forceinline__ float e2m1_to_float(unsigned code) {
  const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = magnitude[code & 7];
  return (code & 8) ? -v : v;
}

// Weights k0 .. k0 + 7 of row `row` of expert `expert` (k0 a multiple of 8) as float32; those at or past
// cols are 0 and never read. F: QuantFormat; S: the scale's element type.
template <int F, typename S>
__device__ __forceinline__ void decode_chunk(const QuantMatrixDev& m, int expert, int row, int k0, float (&w)[kChunk]) {
  const uint8_t* q = m.q + expert * m.expert_q_bytes + static_cast<int64_t>(row) * m.row_bytes;
  const S* scales = static_cast<const S*>(m.scale) + expert * m.expert_scales;
  float s;
  if constexpr (F == static_cast<int>(QuantFormat::kFp8Block)) {
    const int block_row = (row / m.seg_rows) * m.seg_blocks + (row % m.seg_rows) / 128;
    s = scale_to_float(scales[static_cast<int64_t>(block_row) * m.scale_ld + k0 / 128]);
  } else if constexpr (F == static_cast<int>(QuantFormat::kInt8)) {
    s = scale_to_float(scales[row]);
  } else if constexpr (F == static_cast<int>(QuantFormat::kMxfp4)) {
    s = e8m0_to_float(reinterpret_cast<const uint8_t*>(scales)[static_cast<int64_t>(row) * m.scale_ld + k0 / 32]);
  } else {
    s = scale_to_float(scales[static_cast<int64_t>(row) * m.scale_ld + k0 / m.group]);
  }
  float zero = 8.0f;
  if constexpr (F == static_cast<int>(QuantFormat::kInt4)) {
    if (m.zero != nullptr) zero = m.zero[expert * m.expert_scales + static_cast<int64_t>(row) * m.scale_ld + k0 / m.group];
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int k = k0 + i;
    float v = 0.0f;
    if (k < m.cols) {
      if constexpr (F == static_cast<int>(QuantFormat::kFp8Block)) {
        __nv_fp8_e4m3 e;
        e.__x = q[k];
        v = static_cast<float>(e) * s;
      } else if constexpr (F == static_cast<int>(QuantFormat::kInt8)) {
        v = static_cast<float>(static_cast<int8_t>(q[k])) * s;
      } else if constexpr (F == static_cast<int>(QuantFormat::kMxfp4)) {
        const uint8_t byte = q[(k / 32) * 16 + (k % 32) / 2];
        v = e2m1_to_float((k & 1) ? byte >> 4 : byte & 0xF) * s;
      } else {
        const uint8_t byte = q[k / 2];
        v = (static_cast<float>((k & 1) ? byte >> 4 : byte & 0xF) - zero) * s;
      }
    }
    w[i] = v;
  }
}

// acc[r][i] += W[rows[r]] . x_rows[i] over this lane's chunks, tokens i < count.
template <int F, typename S, typename T, int kRows>
__device__ __forceinline__ void dot_rows(const QuantMatrixDev& m, int expert, const int (&rows)[kRows],
                                         const T* const (&x_rows)[kQuantTokens], int count, int K,
                                         float (&acc)[kRows][kQuantTokens]) {
  const int lane = threadIdx.x & 31;
  for (int k0 = lane * kChunk; k0 < K; k0 += 32 * kChunk) {
    float w[kRows][kChunk];
#pragma unroll
    for (int r = 0; r < kRows; ++r) decode_chunk<F, S>(m, expert, rows[r], k0, w[r]);
#pragma unroll
    for (int i = 0; i < kQuantTokens; ++i) {
      if (i < count) {
#pragma unroll
        for (int v = 0; v < kChunk; ++v) {
          const float x = k0 + v < K ? to_float(x_rows[i][k0 + v]) : 0.0f;
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][i] += w[r][v] * x;
        }
      }
    }
  }
}

// intermediate[row, n] = activate_pair(gate . x_t, up . x_t) for the sorted rows of each active expert.
template <int F, typename S, typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
    moe_quant_gate_up_kernel(const T* __restrict__ hidden_states, QuantMatrixDev w13, const int* __restrict__ active_experts,
                             const int* __restrict__ expert_offsets, const int* __restrict__ sorted_pairs, int topk, int H,
                             int I, MoeActArgs<T> act, T* __restrict__ intermediate) {
  const int expert = active_experts[blockIdx.x];
  const int n = static_cast<int>(blockIdx.y) * kQuantWarps + static_cast<int>(threadIdx.x / 32);
  if (expert < 0 || n >= I) return;  // no block-wide barrier below
  const int lane = threadIdx.x & 31;
  const int rows[2] = {n, act.gated ? I + n : n};
  const int row_end = expert_offsets[expert + 1];
  for (int row0 = expert_offsets[expert]; row0 < row_end; row0 += kQuantTokens) {
    const int count = min(kQuantTokens, row_end - row0);
    const T* x_rows[kQuantTokens];
#pragma unroll
    for (int i = 0; i < kQuantTokens; ++i)
      x_rows[i] = hidden_states + static_cast<int64_t>(sorted_pairs[row0 + min(i, count - 1)] / topk) * H;
    float acc[2][kQuantTokens] = {};
    if (act.gated) {
      dot_rows<F, S, T, 2>(w13, expert, rows, x_rows, count, H, acc);
    } else {
      const int up_row[1] = {n};
      float up_acc[1][kQuantTokens] = {};
      dot_rows<F, S, T, 1>(w13, expert, up_row, x_rows, count, H, up_acc);
#pragma unroll
      for (int i = 0; i < kQuantTokens; ++i) acc[1][i] = up_acc[0][i];
    }
#pragma unroll
    for (int i = 0; i < kQuantTokens; ++i) {
      if (i < count) {
        const float gate = warp_sum(acc[0][i]);
        const float up = warp_sum(acc[1][i]);
        if (lane == 0) {
          const int row = row0 + i;
          intermediate[static_cast<int64_t>(row) * I + n] =
              from_float<T>(activate_pair(act, sorted_pairs[row], n, I, gate, up));
        }
      }
    }
  }
}

// expert_out[row, n] = W2[e, n] . intermediate[row] in float32 for the sorted rows of each active expert.
template <int F, typename S, typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
    moe_quant_down_kernel(const T* __restrict__ intermediate, QuantMatrixDev w2, const int* __restrict__ active_experts,
                          const int* __restrict__ expert_offsets, int H, int I, float* __restrict__ expert_out) {
  const int expert = active_experts[blockIdx.x];
  const int n = static_cast<int>(blockIdx.y) * kQuantWarps + static_cast<int>(threadIdx.x / 32);
  if (expert < 0 || n >= H) return;
  const int lane = threadIdx.x & 31;
  const int rows[1] = {n};
  const int row_end = expert_offsets[expert + 1];
  for (int row0 = expert_offsets[expert]; row0 < row_end; row0 += kQuantTokens) {
    const int count = min(kQuantTokens, row_end - row0);
    const T* x_rows[kQuantTokens];
#pragma unroll
    for (int i = 0; i < kQuantTokens; ++i) x_rows[i] = intermediate + static_cast<int64_t>(row0 + min(i, count - 1)) * I;
    float acc[1][kQuantTokens] = {};
    dot_rows<F, S, T, 1>(w2, expert, rows, x_rows, count, I, acc);
#pragma unroll
    for (int i = 0; i < kQuantTokens; ++i) {
      if (i < count) {
        const float sum = warp_sum(acc[0][i]);
        if (lane == 0) expert_out[static_cast<int64_t>(row0 + i) * H + n] = sum;
      }
    }
  }
}

// out[t] = sum_j topk_weights[t, j] * (expert_out[pair_row[t, j]] + w2_bias[g]), in j order; one block per token.
template <typename T>
__global__ void moe_quant_combine_kernel(const float* __restrict__ expert_out, const float* __restrict__ topk_weights,
                                         const int* __restrict__ pair_row, int topk, int H, const T* __restrict__ w2_bias,
                                         const int* __restrict__ global_ids, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < topk; ++j) {
      const int64_t pair = t * topk + j;
      const int row = pair_row[pair];
      if (row < 0) continue;
      float y = expert_out[static_cast<int64_t>(row) * H + h];
      if (w2_bias != nullptr) y += to_float(w2_bias[static_cast<int64_t>(global_ids[pair]) * H + h]);
      acc += topk_weights[pair] * y;
    }
    out[t * H + h] = from_float<T>(acc);
  }
}

template <typename F>
void dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fused_moe_quant: unsupported ", what, " dtype ", dtype);
  }
}

QuantMatrixDev matrix_of(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t cols,
                         int64_t group, int64_t segments) {
  const int64_t experts = q.size(0);
  const int64_t seg_rows = q.size(1) / segments;
  return QuantMatrixDev{static_cast<const uint8_t*>(q.data_ptr()),
                        scale.data_ptr(),
                        zero.defined() ? static_cast<const uint8_t*>(zero.data_ptr()) : nullptr,
                        q.size(1) * q.size(2),
                        experts > 0 ? scale.numel() / experts : 0,
                        static_cast<int>(q.size(2)),
                        static_cast<int>(scale.dim() == 3 ? scale.size(2) : 1),
                        static_cast<int>(group),
                        static_cast<int>(cols),
                        static_cast<int>(seg_rows),
                        static_cast<int>((seg_rows + kFp8BlockSize - 1) / kFp8BlockSize)};
}

}  // namespace

at::Tensor fused_moe_quant_cuda(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w13_scale,
                                const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                                const at::Tensor& topk_ids, c10::string_view format, int64_t group_size,
                                const std::optional<at::Tensor>& w13_zero, const std::optional<at::Tensor>& w2_zero,
                                const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                                const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                                bool gated, double swiglu_alpha, double swiglu_limit) {
  const FusedMoeQuantSizes qs =
      check_fused_moe_quant_args(hidden_states, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, format, group_size,
                                 w13_zero, w2_zero, expert_map, activation, w13_bias, w2_bias, gated, swiglu_alpha,
                                 swiglu_limit);
  const FusedMoeSizes& sizes = qs.moe;
  const int64_t T = sizes.num_tokens, H = sizes.hidden_size, I = sizes.intermediate_size, E = sizes.num_experts;
  const int64_t k = sizes.top_k;
  TORCH_CHECK(hidden_states.is_cuda(), "hidden_states must be a CUDA tensor, got ", hidden_states.device());
  const c10::cuda::OptionalCUDAGuard device_guard(hidden_states.device());
  at::Tensor out = at::empty({T, H}, hidden_states.options());
  if (T == 0 || H == 0) return out;
  if (k == 0 || (I == 0 && !sizes.has_w2_bias)) return out.zero_();
  const int64_t num_pairs = T * k;
  constexpr int64_t kIntLimit = int64_t{1} << 31;
  TORCH_CHECK(num_pairs < kIntLimit && sizes.w13_rows < kIntLimit && H < kIntLimit && E < kIntLimit &&
                  w13.size(1) * w13.size(2) < kIntLimit && w2.size(1) * w2.size(2) < kIntLimit,
              "fused_moe_quant: T * k, w13.size(1), H, E and each expert's bytes must be below 2^31, got T * k = ",
              num_pairs, ", w13 ", w13.sizes(), ", w2 ", w2.sizes());

  const at::Tensor x = hidden_states.contiguous();
  const at::Tensor w13_c = w13.contiguous(), w2_c = w2.contiguous();
  const at::Tensor s13 = w13_scale.contiguous(), s2 = w2_scale.contiguous();
  const at::Tensor z13 = w13_zero.has_value() ? w13_zero->contiguous() : at::Tensor();
  const at::Tensor z2 = w2_zero.has_value() ? w2_zero->contiguous() : at::Tensor();
  const at::Tensor weights_c = topk_weights.contiguous(), ids_c = topk_ids.contiguous();
  const at::Tensor map_c = expert_map.has_value() ? expert_map->contiguous() : at::Tensor();
  const at::Tensor b13 = sizes.has_w13_bias ? w13_bias->contiguous() : at::Tensor();
  const at::Tensor b2 = sizes.has_w2_bias ? w2_bias->contiguous() : at::Tensor();
  const at::Tensor global_ids = !(sizes.has_w13_bias || sizes.has_w2_bias) ? at::Tensor()
                                : ids_c.scalar_type() == at::kInt      ? ids_c
                                                                       : ids_c.to(at::kInt);
  const int* global_ids_ptr = global_ids.defined() ? global_ids.data_ptr<int>() : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // ---- sort the pairs by expert (as fused_moe) ----
  const at::Tensor routing_ints =
      at::empty({MoeRouting::scratch_ints(E, num_pairs)}, hidden_states.options().dtype(at::kInt));
  const MoeRouting routing = MoeRouting::carve(routing_ints.data_ptr<int>(), E, num_pairs);
  C10_CUDA_CHECK(cudaMemsetAsync(routing.expert_counts, 0, (E + 1) * sizeof(int), stream));
  const int pair_blocks = static_cast<int>((num_pairs + kSortThreads - 1) / kSortThreads);
  const int* map_ptr = map_c.defined() ? map_c.data_ptr<int>() : nullptr;
  if (ids_c.scalar_type() == at::kInt) {
    moe_count_pairs_kernel<int><<<pair_blocks, kSortThreads, 0, stream>>>(
        ids_c.data_ptr<int>(), map_ptr, sizes.num_global_experts, static_cast<int>(E), static_cast<int>(num_pairs), routing);
  } else {
    moe_count_pairs_kernel<int64_t><<<pair_blocks, kSortThreads, 0, stream>>>(
        ids_c.data_ptr<int64_t>(), map_ptr, sizes.num_global_experts, static_cast<int>(E), static_cast<int>(num_pairs),
        routing);
  }
  MOE_SWAP_LAUNCH_CHECK();
  moe_scan_experts_kernel<<<1, kSortThreads, 0, stream>>>(static_cast<int>(E), kQuantTokens, routing, nullptr);
  MOE_SWAP_LAUNCH_CHECK();
  moe_scatter_pairs_kernel<<<pair_blocks, kSortThreads, 0, stream>>>(static_cast<int>(num_pairs), routing);
  MOE_SWAP_LAUNCH_CHECK();
  if (debug_sync_now()) {
    int recorded = 0;
    C10_CUDA_CHECK(cudaMemcpyAsync(&recorded, routing.bad_pair, sizeof(int), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    TORCH_CHECK(recorded == 0, "fused_moe_quant: topk_ids[", (num_pairs - recorded) / k, ", ",
                (num_pairs - recorded) % k, "] is not a valid expert id (or maps outside [-1, ", E,
                ") through expert_map); on CUDA such pairs are skipped unless debug mode is on");
  }
  if (E == 0) return out.zero_();

  const QuantMatrixDev m13 = matrix_of(w13_c, s13, z13, H, qs.group_size, gated ? 2 : 1);
  const QuantMatrixDev m2 = matrix_of(w2_c, s2, z2, I, qs.group_size, 1);
  const at::Tensor intermediate = at::empty({num_pairs, I}, x.options());
  const at::Tensor expert_out = at::empty({num_pairs, H}, x.options().dtype(at::kFloat));
  const unsigned max_active = static_cast<unsigned>(std::min<int64_t>(E, num_pairs));
  const dim3 gate_up_grid(max_active, static_cast<unsigned>((I + kQuantWarps - 1) / kQuantWarps));
  const dim3 down_grid(max_active, static_cast<unsigned>((H + kQuantWarps - 1) / kQuantWarps));
  TORCH_CHECK(gate_up_grid.y <= 65535 && down_grid.y <= 65535, "fused_moe_quant: I = ", I, " or H = ", H,
              " is too large (at most ", 65535 * kQuantWarps, ")");

  dispatch_float(x.scalar_type(), "hidden_states", [&](auto tag) {
    using T_ = decltype(tag);
    const MoeActArgs<T_> act{static_cast<int>(sizes.activation), sizes.gated, sizes.swiglu_alpha, sizes.swiglu_limit,
                             sizes.has_w13_bias ? reinterpret_cast<const T_*>(b13.data_ptr()) : nullptr, global_ids_ptr,
                             static_cast<int>(sizes.w13_rows)};
    T_* inter_ptr = reinterpret_cast<T_*>(intermediate.data_ptr());
    float* expert_out_ptr = expert_out.data_ptr<float>();
    const auto launch = [&](auto format_tag, auto scale_tag) {
      constexpr int F = decltype(format_tag)::value;
      using S = decltype(scale_tag);
      if (I > 0) {
        moe_quant_gate_up_kernel<F, S, T_><<<gate_up_grid, kQuantWarps * 32, 0, stream>>>(
            reinterpret_cast<const T_*>(x.data_ptr()), m13, routing.active_experts, routing.expert_offsets,
            routing.sorted_pairs, static_cast<int>(k), static_cast<int>(H), static_cast<int>(I), act, inter_ptr);
        MOE_SWAP_LAUNCH_CHECK();
        moe_quant_down_kernel<F, S, T_><<<down_grid, kQuantWarps * 32, 0, stream>>>(
            inter_ptr, m2, routing.active_experts, routing.expert_offsets, static_cast<int>(H), static_cast<int>(I),
            expert_out_ptr);
        MOE_SWAP_LAUNCH_CHECK();
      } else {
        C10_CUDA_CHECK(cudaMemsetAsync(expert_out_ptr, 0, expert_out.nbytes(), stream));  // only the w2 bias remains
      }
    };
    using Fp8 = std::integral_constant<int, static_cast<int>(QuantFormat::kFp8Block)>;
    using Mx = std::integral_constant<int, static_cast<int>(QuantFormat::kMxfp4)>;
    using Int4 = std::integral_constant<int, static_cast<int>(QuantFormat::kInt4)>;
    using Int8 = std::integral_constant<int, static_cast<int>(QuantFormat::kInt8)>;
    switch (qs.format) {
      case QuantFormat::kFp8Block: launch(Fp8{}, float{}); break;
      case QuantFormat::kInt8: launch(Int8{}, float{}); break;
      case QuantFormat::kMxfp4: launch(Mx{}, uint8_t{}); break;
      case QuantFormat::kInt4:
        dispatch_float(s13.scalar_type(), "w13_scale", [&](auto s_tag) { launch(Int4{}, s_tag); });
        break;
    }
    const int combine_threads = static_cast<int>(std::min<int64_t>(256, ((H + 31) / 32) * 32));
    moe_quant_combine_kernel<T_><<<static_cast<unsigned>(T), combine_threads, 0, stream>>>(
        expert_out_ptr, weights_c.data_ptr<float>(), routing.pair_row, static_cast<int>(k), static_cast<int>(H),
        sizes.has_w2_bias ? reinterpret_cast<const T_*>(b2.data_ptr()) : nullptr, global_ids_ptr,
        reinterpret_cast<T_*>(out.data_ptr()));
    MOE_SWAP_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moe_swap
