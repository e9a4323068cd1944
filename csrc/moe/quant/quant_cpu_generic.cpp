// Portable build of the fused_moe_quant CPU inner loops (see quant_cpu_kernels.h), and the run-time
// choice of build: the one matching the float kernels' build, itself chosen from CPUID.
#include <cstring>
#include <string>

#include "moe/quant/quant_cpu_kernels.h"

namespace moe_swap::cpu {

void dequant_rows_generic(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out) {
  for (int64_t r = 0; r < num_rows; ++r)
    for (int64_t k = 0; k < m.cols; ++k) out[r * m.cols + k] = dequant_value(m, row0 + r, k);
}

void quant_rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                     int64_t row0, int64_t num_rows, float* out, int64_t ld_out) {
  constexpr int64_t kChunk = 256;
  float row[kChunk];
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t t = 0; t < num_tokens; ++t) out[t * ld_out + r] = 0.0f;
    // Dequantize a chunk of the row once, then use it for every token.
    for (int64_t k0 = 0; k0 < m.cols; k0 += kChunk) {
      const int64_t len = m.cols - k0 < kChunk ? m.cols - k0 : kChunk;
      for (int64_t k = 0; k < len; ++k) row[k] = dequant_value(m, row0 + r, k0 + k);
      for (int64_t t = 0; t < num_tokens; ++t) {
        const float* xt = x + t * ld_x + k0;
        float lanes[16] = {};  // independent partial sums the compiler can keep in vector lanes
        int64_t k = 0;
        for (; k + 16 <= len; k += 16)
          for (int l = 0; l < 16; ++l) lanes[l] += row[k + l] * xt[k + l];
        float sum = 0.0f;
        for (; k < len; ++k) sum += row[k] * xt[k];
        for (int l = 0; l < 16; ++l) sum += lanes[l];
        out[t * ld_out + r] += sum;
      }
    }
  }
}

namespace {
const QuantKernelBuild kGeneric{"generic", &quant_rows_times_tokens_generic, &dequant_rows_generic};
#if defined(MOE_SWAP_HAVE_X86_KERNELS)
const QuantKernelBuild kAvx512{"avx512", &quant_rows_times_tokens_avx512, &dequant_rows_avx512};
const QuantKernelBuild kAvx2{"avx2", &quant_rows_times_tokens_avx2, &dequant_rows_avx2};
#endif
}  // namespace

const QuantKernelBuild& quant_kernel_build() {
  static const QuantKernelBuild& build = []() -> const QuantKernelBuild& {
    const std::string name = kernel_build().name;  // throws on a bad MOE_SWAP_CPU_KERNELS, as fused_moe does
#if defined(MOE_SWAP_HAVE_X86_KERNELS)
    if (name == "avx512" || name == "avx512_bf16") return kAvx512;
    if (name == "avx2") return kAvx2;
#endif
    return kGeneric;
  }();
  return build;
}

}  // namespace moe_swap::cpu
