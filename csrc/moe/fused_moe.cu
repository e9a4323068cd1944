// fused_moe on CUDA: sort the token-expert pairs by expert on the device, run the experts (a decode
// path for few pairs, a grouped GEMM path for many), then the weighted combine per token.
//
// Paths, chosen on the host from shapes only (no sync):
//   T * k <= kDecodeMaxPairs: decode kernels (moe_decode.cuh), each selected expert's weights read once.
//   otherwise, bf16 on sm_90/sm_100 exactly, with H, I multiples of 8 and aligned weights: at::_grouped_mm
//     (CUTLASS, offsets on the device) for gate-up and down; it writes bf16, so gate/up and the down
//     output are rounded to bf16 there (within bf16 tolerance of the contract; MOE_SWAP_VENDOR_GEMM=0
//     turns this off);
//   otherwise: the tiled grouped GEMM (moe_gemm.cuh), tensor cores for bf16/fp16 on sm_80+.
// The combine gathers each token's k expert rows in order j = 0..k-1 (deterministic, no atomics),
// adding each pair's w2 bias. Both biases are indexed by the pair's global id (topk_ids, as int32).
// Invalid expert ids are dropped on the device; in debug mode they raise afterwards (not while capturing a graph).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "core/checks.h"
#include "moe/moe_checks.h"
#include "moe/moe_common.cuh"
#include "moe/moe_decode.cuh"
#include "moe/moe_gemm.cuh"
#include "moe/moe_sort.cuh"
#include "ops.h"

namespace moe_swap {

namespace {

using namespace moe_cuda;

// Run f with a value of the CUDA element type matching `dtype` (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_float_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fused_moe: unsupported dtype ", dtype);
  }
}

// out[t, :] = sum_j topk_weights[t, j] * (expert_out[pair_row[t * k + j], :] + w2_bias[g, :]), in j
// order, skipping dropped pairs (g = global_ids[t * k + j]; no bias when w2_bias is null); float32
// sum, written in the output dtype. One block per token.
template <typename T, typename ExpertOutT>
__global__ void moe_combine_kernel(const ExpertOutT* __restrict__ expert_out, int64_t expert_out_stride,
                                   const float* __restrict__ topk_weights, const int* __restrict__ pair_row, int topk,
                                   int H, const T* __restrict__ w2_bias, const int* __restrict__ global_ids,
                                   T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < topk; ++j) {
      const int64_t pair = t * topk + j;
      const int row = pair_row[pair];
      if (row < 0) continue;
      float y = to_float(expert_out[row * expert_out_stride + h]);
      if (w2_bias != nullptr) y += to_float(w2_bias[static_cast<int64_t>(global_ids[pair]) * H + h]);
      acc += topk_weights[pair] * y;
    }
    out[t * H + h] = from_float<T>(acc);
  }
}

// Vendor path: gathered[row] = hidden_states[sorted_pairs[row] / topk] for the sorted rows that exist.
template <typename T>
__global__ void moe_gather_rows_kernel(const T* __restrict__ hidden_states, const int* __restrict__ sorted_pairs,
                                       const int* __restrict__ expert_offsets, int num_experts, int topk, int H,
                                       T* __restrict__ gathered) {
  const int row = blockIdx.x;
  if (row >= expert_offsets[num_experts]) return;
  const int64_t token = sorted_pairs[row] / topk;
  for (int h = threadIdx.x; h < H; h += blockDim.x) gathered[static_cast<int64_t>(row) * H + h] = hidden_states[token * H + h];
}

// Vendor path: intermediate[row, n] = activate_pair(gate_up[row, n], gate_up[row, I + n]) (gated) or
// activate_pair(gate_up[row, n]) (ungated: gate_up holds the up rows only), rounded to T.
template <typename T>
__global__ void moe_act_and_mul_kernel(const T* __restrict__ gate_up, int64_t gate_up_stride,
                                       const int* __restrict__ expert_offsets, const int* __restrict__ sorted_pairs,
                                       int num_experts, int I, MoeActArgs<T> act, T* __restrict__ intermediate) {
  const int row = blockIdx.x;
  if (row >= expert_offsets[num_experts]) return;
  const T* gu = gate_up + row * gate_up_stride;
  const int pair = sorted_pairs[row];
  for (int n = threadIdx.x; n < I; n += blockDim.x) {
    const float gate = act.gated ? to_float(gu[n]) : 0.0f;
    const float up = to_float(gu[act.gated ? I + n : n]);
    intermediate[static_cast<int64_t>(row) * I + n] = from_float<T>(activate_pair(act, pair, n, I, gate, up));
  }
}

bool vendor_gemm_allowed() {
  const char* env = std::getenv("MOE_SWAP_VENDOR_GEMM");
  return env == nullptr || std::string(env) != "0";
}

// Raises when the count kernel recorded an invalid pair (debug mode only: this synchronises).
void raise_on_invalid_pair(const MoeRouting& routing, const at::Tensor& topk_ids,
                           const std::optional<at::Tensor>& expert_map, int64_t num_pairs, int64_t topk,
                           int64_t num_experts, cudaStream_t stream) {
  int recorded = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&recorded, routing.bad_pair, sizeof(int), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (recorded == 0) return;
  const int64_t pair = num_pairs - recorded;
  const int64_t id = topk_ids.reshape({-1})[pair].item<int64_t>();
  const int64_t t = pair / topk;
  const int64_t j = pair % topk;
  if (!expert_map.has_value()) {
    TORCH_CHECK(false, "fused_moe: topk_ids[", t, ", ", j, "] = ", id, " is not a valid expert id: expected [0, ",
                num_experts, ") (w13.size(0)); on CUDA such pairs are skipped unless debug mode is on");
  }
  const int64_t num_ids = expert_map->size(0);
  TORCH_CHECK(id >= 0 && id < num_ids, "fused_moe: topk_ids[", t, ", ", j, "] = ", id,
              " is not a valid global expert id: expected [0, ", num_ids,
              ") (expert_map.size(0)); on CUDA such pairs are skipped unless debug mode is on");
  const int64_t mapped = (*expert_map)[id].item<int64_t>();
  TORCH_CHECK(false, "fused_moe: expert_map[", id, "] = ", mapped, " (for topk_ids[", t, ", ", j,
              "]) is outside [-1, ", num_experts, ") (w13.size(0)); on CUDA such pairs are skipped unless debug mode is on");
}

}  // namespace

at::Tensor fused_moe_cuda(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                          const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                          bool gated, double swiglu_alpha, double swiglu_limit) {
  const FusedMoeSizes sizes = check_fused_moe_args(hidden_states, w13, w2, topk_weights, topk_ids, expert_map,
                                                   activation, w13_bias, w2_bias, gated, swiglu_alpha, swiglu_limit);
  const int64_t T = sizes.num_tokens;
  const int64_t H = sizes.hidden_size;
  const int64_t I = sizes.intermediate_size;
  const int64_t E = sizes.num_experts;
  const int64_t k = sizes.top_k;
  TORCH_CHECK(hidden_states.is_cuda(), "hidden_states must be a CUDA tensor, got ", hidden_states.device());
  const c10::cuda::OptionalCUDAGuard device_guard(hidden_states.device());

  at::Tensor out = at::empty({T, H}, hidden_states.options());
  if (T == 0 || H == 0) return out;
  // I == 0: each pair contributes its w2 bias alone (the combine below), or nothing
  if (k == 0 || (I == 0 && !sizes.has_w2_bias)) return out.zero_();
  const int64_t num_pairs = T * k;
  constexpr int64_t kIntLimit = int64_t{1} << 31;  // kernels index rows and columns with int
  TORCH_CHECK(num_pairs < kIntLimit && sizes.w13_rows < kIntLimit && H < kIntLimit && E < kIntLimit,
              "fused_moe: T * k, w13.size(1), H and E must each be below 2^31, got T * k = ", num_pairs,
              ", w13.size(1) = ", sizes.w13_rows, ", H = ", H, ", E = ", E);

  const at::Tensor x = hidden_states.contiguous();
  const at::Tensor w13_c = w13.contiguous();
  const at::Tensor w2_c = w2.contiguous();
  const at::Tensor weights_c = topk_weights.contiguous();
  const at::Tensor ids_c = topk_ids.contiguous();
  const std::optional<at::Tensor> map_c =
      expert_map.has_value() ? std::optional<at::Tensor>(expert_map->contiguous()) : std::nullopt;
  const int64_t num_ids = sizes.num_global_experts;
  const at::Tensor w13_bias_c = sizes.has_w13_bias ? w13_bias->contiguous() : at::Tensor();
  const at::Tensor w2_bias_c = sizes.has_w2_bias ? w2_bias->contiguous() : at::Tensor();
  // The bias row of each pair: its global id as int32 (a valid id is below E_global < 2^31; pairs
  // whose int64 id does not fit are invalid, dropped by the sort, and never read a bias).
  const at::Tensor global_ids = !(sizes.has_w13_bias || sizes.has_w2_bias) ? at::Tensor()
                                : ids_c.scalar_type() == at::kInt      ? ids_c
                                                                       : ids_c.to(at::kInt);
  const int* global_ids_ptr = global_ids.defined() ? global_ids.data_ptr<int>() : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const bool decode = num_pairs <= kDecodeMaxPairs;
  const bool vendor = !decode && hidden_states.scalar_type() == at::kBFloat16 &&
                      // exactly the archs of torch's CUTLASS path: elsewhere it loops on the host (a sync)
                      props->minor == 0 && (props->major == 9 || props->major == 10) && H % 8 == 0 && I % 8 == 0 && I > 0 &&
                      is_aligned_16(w13_c.data_ptr()) && is_aligned_16(w2_c.data_ptr()) && vendor_gemm_allowed();

  // ---- sort the pairs by expert ----
  const at::Tensor routing_ints =
      at::empty({MoeRouting::scratch_ints(E, num_pairs)}, hidden_states.options().dtype(at::kInt));
  const MoeRouting routing = MoeRouting::carve(routing_ints.data_ptr<int>(), E, num_pairs);
  // The `offs` of at::_grouped_mm: its own tensor, so that it is 16-byte aligned.
  const at::Tensor expert_ends = vendor ? at::empty({E}, routing_ints.options()) : at::Tensor();
  C10_CUDA_CHECK(cudaMemsetAsync(routing.expert_counts, 0, (E + 1) * sizeof(int), stream));
  const int pair_blocks = static_cast<int>((num_pairs + kSortThreads - 1) / kSortThreads);
  const int* map_ptr = map_c.has_value() ? map_c->data_ptr<int>() : nullptr;
  if (ids_c.scalar_type() == at::kInt) {
    moe_count_pairs_kernel<int><<<pair_blocks, kSortThreads, 0, stream>>>(
        ids_c.data_ptr<int>(), map_ptr, num_ids, static_cast<int>(E), static_cast<int>(num_pairs), routing);
  } else {
    moe_count_pairs_kernel<int64_t><<<pair_blocks, kSortThreads, 0, stream>>>(
        ids_c.data_ptr<int64_t>(), map_ptr, num_ids, static_cast<int>(E), static_cast<int>(num_pairs), routing);
  }
  MOE_SWAP_LAUNCH_CHECK();
  moe_scan_experts_kernel<<<1, kSortThreads, 0, stream>>>(static_cast<int>(E), kGemmTileM, routing,
                                                          vendor ? expert_ends.data_ptr<int>() : nullptr);
  MOE_SWAP_LAUNCH_CHECK();
  moe_scatter_pairs_kernel<<<pair_blocks, kSortThreads, 0, stream>>>(static_cast<int>(num_pairs), routing);
  MOE_SWAP_LAUNCH_CHECK();
  if (debug_sync_now()) raise_on_invalid_pair(routing, ids_c, map_c, num_pairs, k, E, stream);

  if (E == 0) return out.zero_();  // every pair was invalid and dropped (or raised above)
  // The activation's arguments in the kernels' element type (the bias pointer is typed).
  const auto act_args = [&](auto tag) {
    using T_ = decltype(tag);
    return MoeActArgs<T_>{static_cast<int>(sizes.activation), sizes.gated, sizes.swiglu_alpha, sizes.swiglu_limit,
                          sizes.has_w13_bias ? reinterpret_cast<const T_*>(w13_bias_c.data_ptr()) : nullptr,
                          global_ids_ptr, static_cast<int>(sizes.w13_rows)};
  };
  const auto w2_bias_of = [&](auto tag) {
    using T_ = decltype(tag);
    return sizes.has_w2_bias ? reinterpret_cast<const T_*>(w2_bias_c.data_ptr()) : nullptr;
  };
  const int combine_threads = static_cast<int>(std::min<int64_t>(256, ((H + 31) / 32) * 32));

  if (vendor) {
    // ---- bf16 on Hopper/Blackwell: CUTLASS grouped GEMM through ATen ----
    using T_ = __nv_bfloat16;
    const at::Tensor gathered = at::empty({num_pairs, H}, x.options());
    moe_gather_rows_kernel<T_><<<static_cast<unsigned>(num_pairs), 256, 0, stream>>>(
        reinterpret_cast<const T_*>(x.data_ptr()), routing.sorted_pairs, routing.expert_offsets, static_cast<int>(E),
        static_cast<int>(k), static_cast<int>(H), reinterpret_cast<T_*>(gathered.data_ptr()));
    MOE_SWAP_LAUNCH_CHECK();
    const at::Tensor gate_up = at::_grouped_mm(gathered, w13_c.transpose(1, 2), expert_ends);
    const at::Tensor intermediate = at::empty({num_pairs, I}, x.options());
    moe_act_and_mul_kernel<T_><<<static_cast<unsigned>(num_pairs), 256, 0, stream>>>(
        reinterpret_cast<const T_*>(gate_up.data_ptr()), gate_up.stride(0), routing.expert_offsets, routing.sorted_pairs,
        static_cast<int>(E), static_cast<int>(I), act_args(T_{}), reinterpret_cast<T_*>(intermediate.data_ptr()));
    MOE_SWAP_LAUNCH_CHECK();
    const at::Tensor expert_out = at::_grouped_mm(intermediate, w2_c.transpose(1, 2), expert_ends);
    moe_combine_kernel<T_, T_><<<static_cast<unsigned>(T), combine_threads, 0, stream>>>(
        reinterpret_cast<const T_*>(expert_out.data_ptr()), expert_out.stride(0), weights_c.data_ptr<float>(),
        routing.pair_row, static_cast<int>(k), static_cast<int>(H), w2_bias_of(T_{}), global_ids_ptr,
        reinterpret_cast<T_*>(out.data_ptr()));
    MOE_SWAP_LAUNCH_CHECK();
    return out;
  }

  const at::Tensor intermediate = at::empty({num_pairs, I}, x.options());
  const at::Tensor expert_out = at::empty({num_pairs, H}, x.options().dtype(at::kFloat));
  dispatch_float_dtype(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    const T_* x_ptr = reinterpret_cast<const T_*>(x.data_ptr());
    const T_* w13_ptr = reinterpret_cast<const T_*>(w13_c.data_ptr());
    const T_* w2_ptr = reinterpret_cast<const T_*>(w2_c.data_ptr());
    T_* inter_ptr = reinterpret_cast<T_*>(intermediate.data_ptr());
    float* expert_out_ptr = expert_out.data_ptr<float>();
    constexpr int kVec = kVecElems<T_>;
    const bool gate_up_vec = H % kVec == 0 && is_aligned_16(x_ptr) && is_aligned_16(w13_ptr);
    const bool down_vec = I % kVec == 0 && is_aligned_16(inter_ptr) && is_aligned_16(w2_ptr);
    const MoeActArgs<T_> act = act_args(tag);

    if (I == 0) {
      C10_CUDA_CHECK(cudaMemsetAsync(expert_out_ptr, 0, expert_out.nbytes(), stream));  // only the w2 bias remains
    } else if (decode) {
      const unsigned max_active = static_cast<unsigned>(std::min<int64_t>(E, num_pairs));
      const dim3 gate_up_grid(max_active, static_cast<unsigned>((I + kDecodeWarps - 1) / kDecodeWarps));
      const dim3 down_grid(max_active, static_cast<unsigned>((H + kDecodeWarps - 1) / kDecodeWarps));
      TORCH_CHECK(gate_up_grid.y <= 65535 && down_grid.y <= 65535, "fused_moe: I = ", I, " or H = ", H,
                  " is too large for the decode kernels (at most ", 65535 * kDecodeWarps, ")");
      moe_decode_gate_up_kernel<T_><<<gate_up_grid, kDecodeWarps * 32, 0, stream>>>(
          x_ptr, w13_ptr, routing.active_experts, routing.expert_offsets, routing.sorted_pairs, static_cast<int>(k),
          static_cast<int>(H), static_cast<int>(I), act, gate_up_vec, inter_ptr);
      MOE_SWAP_LAUNCH_CHECK();
      moe_decode_down_kernel<T_><<<down_grid, kDecodeWarps * 32, 0, stream>>>(
          inter_ptr, w2_ptr, routing.active_experts, routing.expert_offsets, static_cast<int>(H),
          static_cast<int>(I), down_vec, expert_out_ptr);
      MOE_SWAP_LAUNCH_CHECK();
    } else {
      const unsigned row_tiles = static_cast<unsigned>(grouped_gemm_max_row_tiles(num_pairs, E));
      const dim3 gate_up_grid(row_tiles, static_cast<unsigned>((I + kGemmTileN - 1) / kGemmTileN));
      const dim3 down_grid(row_tiles, static_cast<unsigned>((H + kGemmTileN - 1) / kGemmTileN));
      TORCH_CHECK(gate_up_grid.y <= 65535 && down_grid.y <= 65535, "fused_moe: I = ", I, " or H = ", H,
                  " is too large for the grouped GEMM (at most ", 65535 * kGemmTileN, ")");
      GroupedGemmArgs<T_, T_> gate_up_args{x_ptr, w13_ptr, inter_ptr, static_cast<int>(H), static_cast<int>(I),
                                           static_cast<int>(k), act, gate_up_vec, static_cast<int>(E),
                                           routing.expert_offsets, routing.tile_offsets, routing.sorted_pairs};
      GroupedGemmArgs<T_, float> down_args{inter_ptr, w2_ptr, expert_out_ptr, static_cast<int>(I),
                                           static_cast<int>(H), static_cast<int>(k), act, down_vec,
                                           static_cast<int>(E), routing.expert_offsets, routing.tile_offsets,
                                           routing.sorted_pairs};
      const bool tensor_cores = props->major >= 8;
      // gate-up: <tensor cores, gated> picked at run time; the down projection has no gate
      const auto launch_gate_up = [&](auto tensor_cores_tag, auto gated_tag) {
        moe_grouped_gemm_kernel<T_, true, decltype(tensor_cores_tag)::value, decltype(gated_tag)::value>
            <<<gate_up_grid, kGemmThreads, 0, stream>>>(gate_up_args);
        MOE_SWAP_LAUNCH_CHECK();
      };
      const auto launch_down = [&](auto tensor_cores_tag) {
        moe_grouped_gemm_kernel<T_, false, decltype(tensor_cores_tag)::value><<<down_grid, kGemmThreads, 0, stream>>>(
            down_args);
        MOE_SWAP_LAUNCH_CHECK();
      };
      const auto launch_both = [&](auto tensor_cores_tag) {
        if (sizes.gated) {
          launch_gate_up(tensor_cores_tag, std::true_type{});
        } else {
          launch_gate_up(tensor_cores_tag, std::false_type{});
        }
        launch_down(tensor_cores_tag);
      };
      if constexpr (std::is_same_v<T_, float>) {
        launch_both(std::false_type{});
      } else if (tensor_cores) {
        launch_both(std::true_type{});
      } else {
        launch_both(std::false_type{});
      }
    }
    moe_combine_kernel<T_, float><<<static_cast<unsigned>(T), combine_threads, 0, stream>>>(
        expert_out_ptr, H, weights_c.data_ptr<float>(), routing.pair_row, static_cast<int>(k), static_cast<int>(H),
        w2_bias_of(tag), global_ids_ptr, reinterpret_cast<T_*>(out.data_ptr()));
    MOE_SWAP_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moe_swap
