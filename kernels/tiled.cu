// Direct sparse convolution with the input staged in shared memory ("tiled"), for groups == 1.
//
// Same product as gather.cu (forward over the padded input, or input gradient over the placed
// output gradient), organised for reuse: a block takes 16 rows (output channels) and a tile of
// NB images x PB output rows x Q columns (at most 512 positions). It walks the input channels in
// stages of CH channels: the block copies, for each staged channel and image, the band of input
// rows the tile reads (HB = (PB-1)*stride_h + kernel extent rows, full padded width; contiguous
// in global memory) into shared memory, then each warp applies the entries of its 2 rows that
// fall in those channels to its 16 positions per lane. Every input element is read from global
// memory once per block and then from shared memory by all 16 rows; shared-memory reads of a
// warp are consecutive words, so they never conflict whatever the tap's alignment.
//
// Entries are passed packed: (channel << 16) | offset inside the channel's plane, ascending in
// channel within a row (the structures' order), so a per-row cursor consumes each stage's
// entries in one pass.
#include "common.cuh"

#define SC_TILE_WARPS 8
#define SC_TILE_ROWS_PER_WARP 2
#define SC_TILE_ROWS (SC_TILE_WARPS * SC_TILE_ROWS_PER_WARP)
#define SC_TILE_POS_PER_LANE 16
#define SC_TILE_SMEM_FLOATS 12288

extern "C" __global__ void __launch_bounds__(SC_TILE_WARPS * 32) sc_conv_tiled_f32(
    const float* __restrict__ x, const float* __restrict__ weight,
    const long long* __restrict__ wflat, const unsigned int* __restrict__ packed,
    const int* __restrict__ indptr, const int* __restrict__ row_order,
    const float* __restrict__ bias, int has_bias, float* __restrict__ y, int n_batch, int rows,
    int channels, int plane, int plane_h, int plane_w, long long in_batch_stride, int P, int Q,
    int sh, int sw, int NB, int PB, int HB, int CH, int p_tiles) {
  __shared__ float stage[SC_TILE_SMEM_FLOATS];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.y / p_tiles) * NB;
  const int p0 = (blockIdx.y % p_tiles) * PB;
  const int n_valid = min(NB, n_batch - n0);
  const int band_rows = min(HB, plane_h - p0 * sh);  // input rows that exist below the band top
  const int seg_len = band_rows * plane_w;
  const int seg_stride = HB * plane_w;  // shared floats per (channel, image)
  const int ch_stride = NB * seg_stride;
  const int tile_rows = PB * Q;
  const int tile_pos = NB * tile_rows;

  int row[SC_TILE_ROWS_PER_WARP];
  int k[SC_TILE_ROWS_PER_WARP];
  int k_end[SC_TILE_ROWS_PER_WARP];
  float acc[SC_TILE_ROWS_PER_WARP][SC_TILE_POS_PER_LANE];
#pragma unroll
  for (int r = 0; r < SC_TILE_ROWS_PER_WARP; ++r) {
    const int idx = blockIdx.x * SC_TILE_ROWS + warp * SC_TILE_ROWS_PER_WARP + r;
    if (idx < rows) {
      row[r] = row_order[idx];
      k[r] = indptr[row[r]];
      k_end[r] = indptr[row[r] + 1];
    } else {
      row[r] = -1;
      k[r] = 0;
      k_end[r] = 0;
    }
#pragma unroll
    for (int j = 0; j < SC_TILE_POS_PER_LANE; ++j) {
      acc[r][j] = 0.0f;
    }
  }

  // Shared-memory offset of each of this lane's positions (0 for positions past the tile).
  int soff[SC_TILE_POS_PER_LANE];
#pragma unroll
  for (int j = 0; j < SC_TILE_POS_PER_LANE; ++j) {
    const int t = lane + 32 * j;
    if (t < tile_pos) {
      const int nl = t / tile_rows;
      const int rem = t - nl * tile_rows;
      const int pl = rem / Q;
      const int q = rem - pl * Q;
      soff[j] = nl * seg_stride + pl * sh * plane_w + q * sw;
    } else {
      soff[j] = 0;
    }
  }

  const float* x_tile = x + (long long)n0 * in_batch_stride + (long long)p0 * sh * plane_w;
  for (int c0 = 0; c0 < channels; c0 += CH) {
    const int chs = min(CH, channels - c0);
    __syncthreads();  // the previous stage has been consumed
    for (int cs = 0; cs < chs; ++cs) {
      const float* src = x_tile + (long long)(c0 + cs) * plane;
      float* dst = stage + cs * ch_stride;
      if (n_valid == 1) {
        for (int e = threadIdx.x; e < seg_len; e += blockDim.x) {
          dst[e] = __ldg(src + e);
        }
      } else {
        const int total = n_valid * seg_len;
        for (int i = threadIdx.x; i < total; i += blockDim.x) {
          const int nl = i / seg_len;
          const int e = i - nl * seg_len;
          dst[nl * seg_stride + e] = __ldg(src + nl * in_batch_stride + e);
        }
      }
    }
    __syncthreads();
    const unsigned int limit = (unsigned int)(c0 + chs) << 16;
#pragma unroll
    for (int r = 0; r < SC_TILE_ROWS_PER_WARP; ++r) {
      while (k[r] < k_end[r]) {
        const unsigned int pk = __ldg(packed + k[r]);
        if (pk >= limit) {
          break;
        }
        const float v = __ldg(weight + __ldg(wflat + k[r]));
        const float* s = stage + ((int)(pk >> 16) - c0) * ch_stride + (int)(pk & 0xFFFFu);
#pragma unroll
        for (int j = 0; j < SC_TILE_POS_PER_LANE; ++j) {
          acc[r][j] = fmaf(v, s[soff[j]], acc[r][j]);
        }
        ++k[r];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < SC_TILE_ROWS_PER_WARP; ++r) {
    if (row[r] < 0) {
      continue;
    }
    const float b = has_bias ? bias[row[r]] : 0.0f;
#pragma unroll
    for (int j = 0; j < SC_TILE_POS_PER_LANE; ++j) {
      const int t = lane + 32 * j;
      if (t < tile_pos) {
        const int nl = t / tile_rows;
        const int rem = t - nl * tile_rows;
        const int pl = rem / Q;
        const int q = rem - pl * Q;
        if (nl < n_valid && p0 + pl < P) {
          const long long out = ((long long)(n0 + nl) * rows + row[r]) * ((long long)P * Q) +
                                (long long)(p0 + pl) * Q + q;
          y[out] = acc[r][j] + b;
        }
      }
    }
  }
}
