// The grouped GEMM of fused_moe's many-token path: one thread block per (row tile of one expert,
// column tile). Rows are the expert's contiguous sorted rows; both operands are K-contiguous
// (activation rows times weight rows), so out[r, n] = sum_k a[r, k] * w[e, n, k].
//   gate-up: a = hidden_states gathered through sorted_pairs, w = w13; the block computes the gate
//            tile (rows n) and the up tile (rows I + n) together (only the up tile, rows n, when
//            ungated) and writes activate_pair (bias, act(gate) * up or act(up)), rounded to the
//            input dtype, into the intermediate [rows, I].
//   down:    a = the intermediate, w = w2; writes float32 [rows, H] for the weighted combine.
// bf16/fp16 use tensor cores through wmma (sm_80+); float32, and older archs, use float FMA. Both
// accumulate in float32. Tiles are zero-filled past the matrix edges, so any H and I work; 16-byte
// loads are used when K is a multiple of 8 (fp16/bf16) or 4 (fp32) and the operands are aligned.
#pragma once

#include <mma.h>

#include <type_traits>

#include "moe_common.cuh"

namespace moe_swap::moe_cuda {

constexpr int kGemmTileM = 64;
constexpr int kGemmTileN = 64;
constexpr int kGemmTileK = 32;
constexpr int kGemmThreads = 128;           // 4 warps, 2 x 2 over the 64 x 64 tile
constexpr int kGemmPadK = kGemmTileK + 8;   // row stride of the operand tiles: 16-byte multiple, fewer bank conflicts
constexpr int kGemmPadN = kGemmTileN + 4;   // row stride of the float result tile

// Worst-case number of row tiles over all experts: each expert adds at most one partial tile.
inline int64_t grouped_gemm_max_row_tiles(int64_t num_pairs, int64_t num_experts) {
  return (num_pairs + kGemmTileM - 1) / kGemmTileM + (num_experts < num_pairs ? num_experts : num_pairs);
}

template <typename T, typename OutT>
struct GroupedGemmArgs {
  const T* a;    // gate-up: hidden_states [T, K]; down: intermediate [rows, K]
  const T* w;    // gate-up: w13 [E, 2N, K] (gated) or [E, N, K]; down: w2 [E, N, K]
  OutT* out;     // gate-up: intermediate [rows, N] in T; down: float32 [rows, N]
  int K;
  int N;
  int topk;        // gate-up: the hidden_states row of sorted row r is sorted_pairs[r] / topk
  MoeActArgs<T> act;  // gate-up only
  bool vec_ok;     // 16-byte loads allowed (K multiple of the vector, operands aligned)
  int num_experts;
  const int* expert_offsets;
  const int* tile_offsets;
  const int* sorted_pairs;
};

template <typename T, int kNumB>
constexpr int grouped_gemm_smem_bytes() {
  constexpr int tiles = (kGemmTileM + kNumB * kGemmTileN) * kGemmPadK * static_cast<int>(sizeof(T));
  constexpr int result = kNumB * kGemmTileM * kGemmPadN * static_cast<int>(sizeof(float));
  return tiles > result ? tiles : result;
}

// Stage one K-slice: rows [0, 64) of `a_tile` from the activations, rows [0, kNumB * 64) of `b_tile`
// from the weights (part p, row i is weight row p * N + n0 + i). Out-of-range elements become 0.
template <typename T, int kNumB>
__device__ __forceinline__ void load_operand_tiles(T (*a_tile)[kGemmPadK], T (*b_tile)[kGemmPadK], const T* a,
                                                   const int64_t* a_row, const T* w_expert, int n0, int N,
                                                   int K, int k0, bool vec_ok) {
  constexpr int kRows = kGemmTileM + kNumB * kGemmTileN;
  if (vec_ok) {
    constexpr int kVec = kVecElems<T>;
    constexpr int kChunksPerRow = kGemmTileK / kVec;
    for (int q = threadIdx.x; q < kRows * kChunksPerRow; q += kGemmThreads) {
      const int row = q / kChunksPerRow;
      const int col = (q % kChunksPerRow) * kVec;
      const T* src = nullptr;
      if (k0 + col < K) {  // K is a multiple of kVec: the whole chunk is in range
        if (row < kGemmTileM) {
          if (a_row[row] >= 0) src = a + a_row[row] + k0 + col;
        } else {
          const int part = (row - kGemmTileM) / kGemmTileN;
          const int n = n0 + (row - kGemmTileM) % kGemmTileN;
          if (n < N) src = w_expert + (static_cast<int64_t>(part) * N + n) * K + k0 + col;
        }
      }
      const uint4 value = src != nullptr ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
      T* dst = row < kGemmTileM ? &a_tile[row][col] : &b_tile[row - kGemmTileM][col];
      *reinterpret_cast<uint4*>(dst) = value;
    }
  } else {
    for (int q = threadIdx.x; q < kRows * kGemmTileK; q += kGemmThreads) {
      const int row = q / kGemmTileK;
      const int col = q % kGemmTileK;
      T value = from_float<T>(0.0f);
      if (k0 + col < K) {
        if (row < kGemmTileM) {
          if (a_row[row] >= 0) value = a[a_row[row] + k0 + col];
        } else {
          const int part = (row - kGemmTileM) / kGemmTileN;
          const int n = n0 + (row - kGemmTileM) % kGemmTileN;
          if (n < N) value = w_expert[(static_cast<int64_t>(part) * N + n) * K + k0 + col];
        }
      }
      if (row < kGemmTileM) {
        a_tile[row][col] = value;
      } else {
        b_tile[row - kGemmTileM][col] = value;
      }
    }
  }
}

// Float FMA main loop: each thread owns 4 rows x 8 columns (stride 8) of each result part.
template <typename T, int kNumB>
__device__ __forceinline__ void grouped_gemm_mainloop_fma(unsigned char* smem, const T* a, const int64_t* a_row,
                                                          const T* w_expert, int n0, int N, int K, bool vec_ok) {
  auto a_tile = reinterpret_cast<T (*)[kGemmPadK]>(smem);
  auto b_tile = reinterpret_cast<T (*)[kGemmPadK]>(smem + kGemmTileM * kGemmPadK * sizeof(T));
  const int ty = threadIdx.x / 8;  // rows ty * 4 .. ty * 4 + 3
  const int tx = threadIdx.x % 8;  // columns tx, tx + 8, ..., tx + 56
  float acc[kNumB][4][8];
#pragma unroll
  for (int p = 0; p < kNumB; ++p)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[p][i][j] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += kGemmTileK) {
    load_operand_tiles<T, kNumB>(a_tile, b_tile, a, a_row, w_expert, n0, N, K, k0, vec_ok);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kGemmTileK; ++kk) {
      float av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = to_float(a_tile[ty * 4 + i][kk]);
#pragma unroll
      for (int p = 0; p < kNumB; ++p)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float bv = to_float(b_tile[p * kGemmTileN + tx + 8 * j][kk]);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[p][i][j] += av[i] * bv;
        }
    }
    __syncthreads();
  }
  auto c_tile = reinterpret_cast<float (*)[kGemmTileM][kGemmPadN]>(smem);
#pragma unroll
  for (int p = 0; p < kNumB; ++p)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c_tile[p][ty * 4 + i][tx + 8 * j] = acc[p][i][j];
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// Tensor-core main loop (bf16/fp16, sm_80+): each warp owns a 32 x 32 block of each result part as
// 2 x 2 wmma 16x16x16 fragments with float accumulators.
template <typename T, int kNumB>
__device__ __forceinline__ void grouped_gemm_mainloop_wmma(unsigned char* smem, const T* a, const int64_t* a_row,
                                                           const T* w_expert, int n0, int N, int K, bool vec_ok) {
  using namespace nvcuda;
  auto a_tile = reinterpret_cast<T (*)[kGemmPadK]>(smem);
  auto b_tile = reinterpret_cast<T (*)[kGemmPadK]>(smem + kGemmTileM * kGemmPadK * sizeof(T));
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 2;
  const int warp_n = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kNumB][2][2];
#pragma unroll
  for (int p = 0; p < kNumB; ++p)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[p][i][j], 0.0f);

  for (int k0 = 0; k0 < K; k0 += kGemmTileK) {
    load_operand_tiles<T, kNumB>(a_tile, b_tile, a, a_row, w_expert, n0, N, K, k0, vec_ok);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], &a_tile[warp_m * 32 + i * 16][kk], kGemmPadK);
#pragma unroll
      for (int p = 0; p < kNumB; ++p)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // b_tile holds weight rows [n][k]: as a K x N operand that is column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
          wmma::load_matrix_sync(b_frag, &b_tile[p * kGemmTileN + warp_n * 32 + j * 16][kk], kGemmPadK);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[p][i][j], a_frag[i], b_frag, acc[p][i][j]);
        }
    }
    __syncthreads();
  }
  auto c_tile = reinterpret_cast<float (*)[kGemmTileM][kGemmPadN]>(smem);
#pragma unroll
  for (int p = 0; p < kNumB; ++p)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&c_tile[p][warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[p][i][j], kGemmPadN,
                                wmma::mem_row_major);
}
#endif

// grid: (grouped_gemm_max_row_tiles, ceil(N / 64)); blocks past the real tile count exit at once.
// kGated (gate-up only): w13 holds gate and up rows; else up rows only, one weight tile.
template <typename T, bool kGateUp, bool kTensorCores, bool kGated = true>
__global__ void __launch_bounds__(kGemmThreads)
    moe_grouped_gemm_kernel(GroupedGemmArgs<T, std::conditional_t<kGateUp, T, float>> args) {
  constexpr int kNumB = kGateUp && kGated ? 2 : 1;
  __shared__ __align__(128) unsigned char smem[grouped_gemm_smem_bytes<T, kNumB>()];
  __shared__ int64_t a_row[kGemmTileM];

  const int tile = static_cast<int>(blockIdx.x);
  if (tile >= args.tile_offsets[args.num_experts]) return;
  // The tile's expert: the last e with tile_offsets[e] <= tile (empty experts share the next offset).
  int lo = 0;
  int hi = args.num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.tile_offsets[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int expert = lo;
  const int row_begin = args.expert_offsets[expert] + (tile - args.tile_offsets[expert]) * kGemmTileM;
  const int row_end = args.expert_offsets[expert + 1];
  const int n0 = static_cast<int>(blockIdx.y) * kGemmTileN;

  for (int m = threadIdx.x; m < kGemmTileM; m += kGemmThreads) {
    const int row = row_begin + m;
    int64_t source = -1;
    if (row < row_end) {
      const int64_t a_index = kGateUp ? args.sorted_pairs[row] / args.topk : row;
      source = a_index * args.K;
    }
    a_row[m] = source;
  }
  const T* w_expert = args.w + static_cast<int64_t>(expert) * kNumB * args.N * args.K;
  __syncthreads();

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTensorCores) {
    grouped_gemm_mainloop_wmma<T, kNumB>(smem, args.a, a_row, w_expert, n0, args.N, args.K, args.vec_ok);
  } else {
    grouped_gemm_mainloop_fma<T, kNumB>(smem, args.a, a_row, w_expert, n0, args.N, args.K, args.vec_ok);
  }
#else
  grouped_gemm_mainloop_fma<T, kNumB>(smem, args.a, a_row, w_expert, n0, args.N, args.K, args.vec_ok);
#endif
  __syncthreads();

  auto c_tile = reinterpret_cast<const float (*)[kGemmTileM][kGemmPadN]>(smem);
  for (int q = threadIdx.x; q < kGemmTileM * kGemmTileN; q += kGemmThreads) {
    const int m = q / kGemmTileN;
    const int n = q % kGemmTileN;
    const int row = row_begin + m;
    const int col = n0 + n;
    if (row < row_end && col < args.N) {
      if constexpr (kGateUp) {
        const float gate = kGated ? c_tile[0][m][n] : 0.0f;
        const float up = c_tile[kNumB - 1][m][n];
        args.out[static_cast<int64_t>(row) * args.N + col] =
            from_float<T>(activate_pair(args.act, args.sorted_pairs[row], col, args.N, gate, up));
      } else {
        args.out[static_cast<int64_t>(row) * args.N + col] = c_tile[0][m][n];
      }
    }
  }
}

}  // namespace moe_swap::moe_cuda
