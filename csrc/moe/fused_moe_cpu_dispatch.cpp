// The run-time choice of the fused_moe CPU kernel build (see fused_moe_cpu_kernels.h): the best one
// CPUID says this CPU runs, or the one MOE_SWAP_CPU_KERNELS names (the tests force each in turn).
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "moe/fused_moe_cpu_kernels.h"
#include "ops.h"

namespace moe_swap::cpu {
namespace {

// small_batch_limit, measured (2 cores, Mixtral- and Qwen3-like shapes): the tiles read the weights
// once and beat MKL, which packs (rereads and rewrites) them per call, up to 64-128 tokens per expert.
// AVX-512 on the CI machine; AVX2 (Zen 3, bf16, MOE_SWAP_CPU_SMALL_BATCH=0 vs 100000): tiles 1.6x the
// GEMM at 64 tokens per expert, 1.1-1.4x at 128, 0.65-0.8x at 256.
// avx512_bf16 with bfloat16 weights: no limit, its packed vdpbf16ps products run at native bf16 rates
// where the GEMM path widens to float32 (Zen 4: oneDNN's bf16 matmul 190 GFLOP/s, float32 50-120).
constexpr int64_t kNoLimit = INT64_MAX;
const KernelBuild kBuilds[] = {
#if defined(MOE_SWAP_HAVE_X86_KERNELS)
    {"avx512_bf16", &rows_times_tokens_avx512_bf16, &act_and_mul_avx512, {128, kNoLimit, 128}},
    {"avx512", &rows_times_tokens_avx512, &act_and_mul_avx512, {128, 128, 128}},
    {"avx2", &rows_times_tokens_avx2, &act_and_mul_generic, {128, 128, 128}},
#endif
    {"generic", &rows_times_tokens_generic, &act_and_mul_generic, {128, 128, 128}},
};

bool cpu_runs(const KernelBuild& build) {
  const std::string name = build.name;
  if (name == "generic") return true;
#if defined(MOE_SWAP_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (name == "avx2") return avx2;
  if (name == "avx512") return avx512;
  if (name == "avx512_bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

std::string known_builds() {
  std::string names;
  for (const KernelBuild& build : kBuilds) names += (names.empty() ? "" : ", ") + std::string(build.name);
  return names;
}

const KernelBuild& choose_build() {
  const char* forced = std::getenv("MOE_SWAP_CPU_KERNELS");
  if (forced != nullptr && forced[0] != '\0') {
    for (const KernelBuild& build : kBuilds) {
      if (std::strcmp(build.name, forced) != 0) continue;
      TORCH_CHECK_VALUE(cpu_runs(build), "MOE_SWAP_CPU_KERNELS=", forced,
                  ": this CPU lacks the instructions that build needs; it runs: ", [] {
                    std::string names;
                    for (const std::string& n : runnable_kernel_builds()) names += (names.empty() ? "" : ", ") + n;
                    return names;
                  }());
      return build;
    }
    TORCH_CHECK_VALUE(false, "MOE_SWAP_CPU_KERNELS=", forced, " is not a kernel build: expected one of ", known_builds(),
                " (or unset, for the best this CPU runs)");
  }
  for (const KernelBuild& build : kBuilds)
    if (cpu_runs(build)) return build;
  return kBuilds[sizeof(kBuilds) / sizeof(kBuilds[0]) - 1];
}

}  // namespace

const KernelBuild& kernel_build() {
  // A bad MOE_SWAP_CPU_KERNELS throws here, and the next call throws again (the static stays unset).
  static const KernelBuild& build = choose_build();
  return build;
}

std::vector<std::string> runnable_kernel_builds() {
  std::vector<std::string> names;
  for (const KernelBuild& build : kBuilds)
    if (cpu_runs(build)) names.emplace_back(build.name);
  return names;
}

}  // namespace moe_swap::cpu

namespace moe_swap {

std::string cpu_kernel_build() { return cpu::kernel_build().name; }

std::vector<std::string> cpu_kernel_builds() { return cpu::runnable_kernel_builds(); }

}  // namespace moe_swap
