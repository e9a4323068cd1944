// The torch library `moe_swap`: every schema of the project, and which kernel serves which backend.
// The schema strings are the API; Python wrappers and fake kernels live in moe_swap/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "core/checks.h"
#include "ops.h"

TORCH_LIBRARY(moe_swap, m) {
  // Route tokens to experts: softmax/sigmoid scores, optional group limit and selection bias,
  // top-k, optional renormalisation and scaling. Returns (topk_weights f32 [T,k], topk_ids i32 [T,k]).
  m.def(
      "topk_route(Tensor router_logits, int top_k, str scoring=\"softmax\", bool renormalize=False, "
      "int num_expert_group=1, int topk_group=1, Tensor? correction_bias=None, "
      "float routed_scaling_factor=1.0) -> (Tensor topk_weights, Tensor topk_ids)");
  // The MoE layer: out[t] = sum_j w[t,j] * w2[e] @ (act(w13[e,:I] @ x_t) * (w13[e,I:] @ x_t)),
  // e = expert_map[topk_ids[t,j]] when a map is given (-1: not held here, contributes nothing).
  m.def(
      "fused_moe(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
      "Tensor? expert_map=None, str activation=\"silu\") -> Tensor");
  // Debug switch: synchronise and check after every CUDA launch; invalid expert ids become errors.
  m.def("set_debug(bool enabled) -> ()", &moe_swap::set_debug);
  // Whether the debug switch is on.
  m.def("debug_enabled() -> bool", &moe_swap::debug_enabled);
}

TORCH_LIBRARY_IMPL(moe_swap, CPU, m) {
  m.impl("topk_route", &moe_swap::topk_route_cpu);
  m.impl("fused_moe", &moe_swap::fused_moe_cpu);
}

#ifdef MOE_SWAP_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_swap, CUDA, m) {
  m.impl("topk_route", &moe_swap::topk_route_cuda);
  m.impl("fused_moe", &moe_swap::fused_moe_cuda);
}
#endif

// `import moe_swap._C` loads this library, whose static initialisers above register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "moe_swap native ops (see torch.ops.moe_swap)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
