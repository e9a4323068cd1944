// Every native entry point of moe_swap, one line each; schemas live in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace moe_swap {

// ---- routing (csrc/routing) ----
std::tuple<at::Tensor, at::Tensor> topk_route_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                  c10::string_view scoring, bool renormalize,
                                                  int64_t num_expert_group, int64_t topk_group,
                                                  const std::optional<at::Tensor>& correction_bias,
                                                  double routed_scaling_factor);
#ifdef MOE_SWAP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> topk_route_cuda(const at::Tensor& router_logits, int64_t top_k,
                                                   c10::string_view scoring, bool renormalize,
                                                   int64_t num_expert_group, int64_t topk_group,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   double routed_scaling_factor);
#endif

// ---- MoE compute (csrc/moe) ----
at::Tensor fused_moe_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                         const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                         bool gated, double swiglu_alpha, double swiglu_limit);
#ifdef MOE_SWAP_WITH_CUDA
at::Tensor fused_moe_cuda(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                          const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                          bool gated, double swiglu_alpha, double swiglu_limit);
#endif

// ---- quantized MoE compute (csrc/moe/quant) ----
at::Tensor fused_moe_quant_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w13_scale,
                               const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                               const at::Tensor& topk_ids, c10::string_view format, int64_t group_size,
                               const std::optional<at::Tensor>& w13_zero, const std::optional<at::Tensor>& w2_zero,
                               const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                               const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias, bool gated,
                               double swiglu_alpha, double swiglu_limit);
#ifdef MOE_SWAP_WITH_CUDA
at::Tensor fused_moe_quant_cuda(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w13_scale,
                                const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                                const at::Tensor& topk_ids, c10::string_view format, int64_t group_size,
                                const std::optional<at::Tensor>& w13_zero, const std::optional<at::Tensor>& w2_zero,
                                const std::optional<at::Tensor>& expert_map, c10::string_view activation,
                                const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias, bool gated,
                                double swiglu_alpha, double swiglu_limit);
#endif

// ---- diagnostics (csrc/core/parallel.cpp) ----
int64_t cpu_parallel_threads();
std::string cpu_kernel_build();
std::vector<std::string> cpu_kernel_builds();

// ---- device-side expert pull (csrc/streaming/expert_pull.*) ----
void expert_cache_pull_cpu(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                           const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                           const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                           const at::Tensor& expert_map, const at::Tensor& counters);
#ifdef MOE_SWAP_WITH_CUDA
void expert_cache_pull_cuda(const at::Tensor& topk_ids, const at::Tensor& host_w13, const at::Tensor& host_w2,
                            const at::Tensor& pool_w13, const at::Tensor& pool_w2, int64_t slot_base,
                            const at::Tensor& slot_expert, const at::Tensor& slot_stamp, const at::Tensor& clock,
                            const at::Tensor& expert_map, const at::Tensor& counters);
#endif

}  // namespace moe_swap
