// The inner loops of the CPU fused_moe_quant on raw pointers: a "rows times tokens" product that
// dequantizes each weight in registers as it reads it (few tokens: each weight byte is read once per
// call), and a dequantization of a few rows into a float buffer (many tokens: the float kernels of
// fused_moe_cpu_kernels.h then reuse the rows for every token). Builds chosen with the float kernels'
// (cpu::kernel_build(), so MOE_SWAP_CPU_KERNELS forces both): avx512 (quant_cpu_avx512.cpp, also under
// avx512_bf16), avx2 (quant_cpu_avx2.cpp), generic (quant_cpu_generic.cpp). No torch headers: the ISA
// files are compiled with target pragmas.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moe/fused_moe_cpu_kernels.h"

namespace moe_swap::cpu {

// QuantFormat of quant_checks.h, as int (this header includes no torch header).
enum class QFormat : int { kFp8Block = 0, kMxfp4 = 1, kInt4 = 2, kInt8 = 3 };

// One expert's quantized matrix W [rows, cols] (layouts: moe_swap/quant.py).
struct QuantMatrix {
  QFormat format;
  const uint8_t* q;      // row 0's bytes
  int64_t row_bytes;     // bytes per row: cols (fp8, int8), ceil(cols/32)*16 (mxfp4), ceil(cols/2) (int4)
  const void* scale;     // this expert's scales: fp8 f32 [row blocks, ceil(cols/128)]; mxfp4 u8 [rows, ceil(cols/32)];
                         // int4 [rows, ceil(cols/g)] of scale_type; int8 f32 [rows]
  WeightType scale_type; // int4 only (the others' scale types are fixed)
  int64_t scale_ld;      // scales per row of the scale tensor (fp8: per row block)
  const uint8_t* zero;   // int4: u8 [rows, ceil(cols/g)], or nullptr (zero point 8)
  int64_t group;         // int4 group size (32, 64, 128)
  int64_t cols;          // K
  int64_t seg_rows;      // fp8: rows per segment (a gated w13's halves are blocked separately)
  int64_t seg_blocks;    // fp8: row blocks per segment
};

// out[t * ld_out + r] = sum_k x[t * ld_x + k] * W[row0 + r, k] for t < num_tokens, r < num_rows (float sums).
using QuantRowsTimesTokensFn = void (*)(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                        int64_t row0, int64_t num_rows, float* out, int64_t ld_out);
// out[r * m.cols + k] = W[row0 + r, k] as float32, for r < num_rows.
using DequantRowsFn = void (*)(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out);

struct QuantKernelBuild {
  const char* name;
  QuantRowsTimesTokensFn rows_times_tokens;
  DequantRowsFn dequant_rows;
};

void quant_rows_times_tokens_generic(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                     int64_t row0, int64_t num_rows, float* out, int64_t ld_out);
void dequant_rows_generic(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out);
#if defined(MOE_SWAP_HAVE_X86_KERNELS)
void quant_rows_times_tokens_avx512(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                    int64_t row0, int64_t num_rows, float* out, int64_t ld_out);
void dequant_rows_avx512(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out);
void quant_rows_times_tokens_avx2(const float* x, int64_t num_tokens, int64_t ld_x, const QuantMatrix& m,
                                  int64_t row0, int64_t num_rows, float* out, int64_t ld_out);
void dequant_rows_avx2(const QuantMatrix& m, int64_t row0, int64_t num_rows, float* out);
#endif

// The build matching cpu::kernel_build() (avx512_bf16 and avx512 share one).
const QuantKernelBuild& quant_kernel_build();

// ---- scalar decoding, shared by the portable build and the vector builds' setup ----

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) return std::ldexp(static_cast<float>(mant), -24) * (sign ? -1.0f : 1.0f);
  if (exp == 31) return float_from_bits(sign | 0x7F800000u | (mant << 13));
  return float_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

inline float scale_value(const void* scales, WeightType type, int64_t index) {
  switch (type) {
    case WeightType::kFloat32: return static_cast<const float*>(scales)[index];
    case WeightType::kBFloat16: return float_from_bits(static_cast<uint32_t>(static_cast<const uint16_t*>(scales)[index]) << 16);
    case WeightType::kFloat16: return half_to_float(static_cast<const uint16_t*>(scales)[index]);
  }
  return 0.0f;
}

// e8m0: 2^(e - 127); 255 is NaN.
inline float e8m0_value(uint8_t e) {
  if (e == 255) return float_from_bits(0x7FC00000u);
  if (e == 0) return float_from_bits(0x00400000u);  // 2^-127, a float32 subnormal
  return float_from_bits(static_cast<uint32_t>(e) << 23);
}

// float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN.
inline float e4m3_value(uint8_t b) {
  const int exp = (b >> 3) & 0xF, mant = b & 7;
  float v;
  if (exp == 15 && mant == 7) return float_from_bits(0x7FC00000u);
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -9);
  else v = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
  return (b & 0x80) ? -v : v;
}

inline constexpr float kE2m1Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The fp8 scale row of weight row r.
inline int64_t fp8_scale_row(const QuantMatrix& m, int64_t r) {
  return (r / m.seg_rows) * m.seg_blocks + (r % m.seg_rows) / 128;
}

// W[r, k] as float32, computed as the reference does: (u - zero) * scale, code * scale, q * scale.
inline float dequant_value(const QuantMatrix& m, int64_t r, int64_t k) {
  const uint8_t* row = m.q + r * m.row_bytes;
  switch (m.format) {
    case QFormat::kFp8Block:
      return e4m3_value(row[k]) * static_cast<const float*>(m.scale)[fp8_scale_row(m, r) * m.scale_ld + k / 128];
    case QFormat::kMxfp4: {
      const uint8_t byte = row[(k / 32) * 16 + (k % 32) / 2];
      const uint8_t code = (k & 1) ? byte >> 4 : byte & 0xF;
      return kE2m1Values[code] * e8m0_value(static_cast<const uint8_t*>(m.scale)[r * m.scale_ld + k / 32]);
    }
    case QFormat::kInt4: {
      const uint8_t byte = row[k / 2];
      const float u = static_cast<float>((k & 1) ? byte >> 4 : byte & 0xF);
      const int64_t g = r * m.scale_ld + k / m.group;
      const float z = m.zero != nullptr ? static_cast<float>(m.zero[g]) : 8.0f;
      return (u - z) * scale_value(m.scale, m.scale_type, g);
    }
    case QFormat::kInt8:
      return static_cast<float>(static_cast<int8_t>(row[k])) * static_cast<const float*>(m.scale)[r];
  }
  return 0.0f;
}

// ---- shared by the vector builds ----

// The pointers of one weight row.
struct QuantRow {
  const uint8_t* q;
  const float* scale_f32;  // fp8: the row's scale-block row; int8: its own scale
  const void* scale;       // mxfp4 (u8) and int4 (scale_type): the row's group scales
  const uint8_t* zero;     // int4: the row's zero points, or nullptr (8)
};

inline QuantRow row_of(const QuantMatrix& m, int64_t r) {
  QuantRow row{m.q + r * m.row_bytes, nullptr, nullptr, nullptr};
  switch (m.format) {
    case QFormat::kFp8Block: row.scale_f32 = static_cast<const float*>(m.scale) + fp8_scale_row(m, r) * m.scale_ld; break;
    case QFormat::kInt8: row.scale_f32 = static_cast<const float*>(m.scale) + r; break;
    case QFormat::kMxfp4: row.scale = static_cast<const uint8_t*>(m.scale) + r * m.scale_ld; break;
    case QFormat::kInt4:
      row.scale = static_cast<const char*>(m.scale) + r * m.scale_ld * (m.scale_type == WeightType::kFloat32 ? 4 : 2);
      row.zero = m.zero != nullptr ? m.zero + r * m.scale_ld : nullptr;
      break;
  }
  return row;
}

// Calls fn(std::integral_constant<QFormat, F>{}) with F the run-time format.
template <typename Fn>
inline void with_format(QFormat f, Fn&& fn) {
  switch (f) {
    case QFormat::kFp8Block: return fn(std::integral_constant<QFormat, QFormat::kFp8Block>{});
    case QFormat::kMxfp4: return fn(std::integral_constant<QFormat, QFormat::kMxfp4>{});
    case QFormat::kInt4: return fn(std::integral_constant<QFormat, QFormat::kInt4>{});
    case QFormat::kInt8: return fn(std::integral_constant<QFormat, QFormat::kInt8>{});
  }
}

}  // namespace moe_swap::cpu
