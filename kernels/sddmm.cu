// Weight gradient on the mask (sampled dense-dense product, SDDMM) of sparse conv2d and linear
// layers, in the formulation of gather.cu: for entry k of row `row` (group g),
//
//   dw[k] = sum over n, p, q of dy[n, row, p, q]
//             * x[n*in_batch_stride + g*in_group_stride + offsets[k]*off_scale
//                 + p*row_step + q*col_step]
//
// i.e. the same input element the forward pass multiplied by weight k, times the output
// gradient. Block (row, chunk) covers blockDim.x * VPT positions of one row: every thread keeps
// its VPT output-gradient values in registers, and for each entry adds its VPT products, the
// warp sums them with shuffles and the block sums the warps in shared memory. The block writes
// its sum for each entry to partial[chunk, k] (no atomics), and sc_reduce_partials_f32 adds the
// chunks in a fixed order and scatters the result into the dense weight gradient through wflat.
// The result is therefore deterministic.
#include "common.cuh"

template <int VPT>
__device__ __forceinline__ void sc_sddmm_scalar(
    const float* __restrict__ x, const float* __restrict__ dy, const int* __restrict__ offsets,
    int off_scale, const int* __restrict__ indptr, const int* __restrict__ row_order,
    float* __restrict__ partial, int nnz, int n_batch, int rows, int rows_per_group,
    long long in_batch_stride, long long in_group_stride, int P, int Q, int row_step,
    int col_step) {
  __shared__ int tile[SC_ENTRY_TILE];
  __shared__ float warp_sums[SC_MAX_WARPS][SC_ENTRY_TILE];
  const int row = row_order[blockIdx.x];
  const int begin = indptr[row];
  const int end = indptr[row + 1];
  const long long pq = (long long)P * Q;
  const long long total = (long long)n_batch * pq;
  const long long span = (long long)blockDim.x * VPT;
  const long long chunk = blockIdx.y;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n_warps = blockDim.x >> 5;
  const float* xg = x + (long long)(row / rows_per_group) * in_group_stride;

  const float* src[VPT];
  float g[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    ScPosition pos;
    const long long t = chunk * span + threadIdx.x + (long long)i * blockDim.x;
    if (sc_position(t, total, pq, Q, row, rows, in_batch_stride, row_step, col_step, &pos)) {
      src[i] = xg + pos.input;
      g[i] = __ldg(dy + pos.output);
    } else {
      src[i] = xg;  // a valid address, multiplied by zero
      g[i] = 0.0f;
    }
  }
  for (int k0 = begin; k0 < end; k0 += SC_ENTRY_TILE) {
    const int count = min(SC_ENTRY_TILE, end - k0);
    __syncthreads();
    sc_stage_offsets(tile, offsets, off_scale, k0, count);
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const int off = tile[j];
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        s = fmaf(g[i], __ldg(src[i] + off), s);
      }
      s = sc_warp_sum(s);
      if (lane == 0) {
        warp_sums[warp][j] = s;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      float s = 0.0f;
      for (int w = 0; w < n_warps; ++w) {
        s += warp_sums[w][j];
      }
      partial[chunk * nnz + k0 + j] = s;
    }
  }
}

// Vector variant (linear layers): positions are quads of 4 consecutive q read with float4 loads;
// the same alignment conditions as the vector gather.
template <int VPT>
__device__ __forceinline__ void sc_sddmm_vec4(
    const float* __restrict__ x, const float* __restrict__ dy, const int* __restrict__ offsets,
    int off_scale, const int* __restrict__ indptr, const int* __restrict__ row_order,
    float* __restrict__ partial, int nnz, int n_batch, int rows, int rows_per_group,
    long long in_batch_stride, long long in_group_stride, int P, int Q, int row_step) {
  __shared__ int tile[SC_ENTRY_TILE];
  __shared__ float warp_sums[SC_MAX_WARPS][SC_ENTRY_TILE];
  const int row = row_order[blockIdx.x];
  const int begin = indptr[row];
  const int end = indptr[row + 1];
  const int Q4 = Q / 4;
  const long long pq4 = (long long)P * Q4;
  const long long total = (long long)n_batch * pq4;
  const long long span = (long long)blockDim.x * VPT;
  const long long chunk = blockIdx.y;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n_warps = blockDim.x >> 5;
  const float* xg = x + (long long)(row / rows_per_group) * in_group_stride;

  const float* src[VPT];
  float4 g[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    ScPosition pos;
    const long long t = chunk * span + threadIdx.x + (long long)i * blockDim.x;
    if (sc_position(t, total, pq4, Q4, row, rows, in_batch_stride, row_step, 4, &pos)) {
      src[i] = xg + pos.input;
      const long long n = t / pq4;
      const long long rem4 = t - n * pq4;
      g[i] = __ldg(reinterpret_cast<const float4*>(dy + (n * rows + row) * (pq4 * 4) + rem4 * 4));
    } else {
      src[i] = xg;
      g[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  for (int k0 = begin; k0 < end; k0 += SC_ENTRY_TILE) {
    const int count = min(SC_ENTRY_TILE, end - k0);
    __syncthreads();
    sc_stage_offsets(tile, offsets, off_scale, k0, count);
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const int off = tile[j];
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(src[i] + off));
        s = fmaf(g[i].x, v.x, s);
        s = fmaf(g[i].y, v.y, s);
        s = fmaf(g[i].z, v.z, s);
        s = fmaf(g[i].w, v.w, s);
      }
      s = sc_warp_sum(s);
      if (lane == 0) {
        warp_sums[warp][j] = s;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      float s = 0.0f;
      for (int w = 0; w < n_warps; ++w) {
        s += warp_sums[w][j];
      }
      partial[chunk * nnz + k0 + j] = s;
    }
  }
}

#define SC_SDDMM_PARAMS                                                                        \
  const float *__restrict__ x, const float *__restrict__ dy, const int *__restrict__ offsets,  \
      int off_scale, const int *__restrict__ indptr, const int *__restrict__ row_order,        \
      float *__restrict__ partial, int nnz, int n_batch, int rows, int rows_per_group,         \
      long long in_batch_stride, long long in_group_stride, int P, int Q, int row_step,        \
      int col_step

#define SC_SDDMM_ARGS                                                                         \
  x, dy, offsets, off_scale, indptr, row_order, partial, nnz, n_batch, rows, rows_per_group,  \
      in_batch_stride, in_group_stride, P, Q, row_step

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_sddmm_f32_v4(SC_SDDMM_PARAMS) {
  sc_sddmm_scalar<4>(SC_SDDMM_ARGS, col_step);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_sddmm_f32_v16(SC_SDDMM_PARAMS) {
  sc_sddmm_scalar<16>(SC_SDDMM_ARGS, col_step);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_sddmm_f32_q1(SC_SDDMM_PARAMS) {
  (void)col_step;
  sc_sddmm_vec4<1>(SC_SDDMM_ARGS);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_sddmm_f32_q4(SC_SDDMM_PARAMS) {
  (void)col_step;
  sc_sddmm_vec4<4>(SC_SDDMM_ARGS);
}

// dw_dense[wflat[k]] = sum over chunks c of partial[c, k], in chunk order. The rest of dw_dense
// is left as it is (the caller zeroes it).
extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_reduce_partials_f32(
    const float* __restrict__ partial, int n_chunks, int nnz, const long long* __restrict__ wflat,
    float* __restrict__ dw_dense) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= nnz) {
    return;
  }
  float s = 0.0f;
  for (int c = 0; c < n_chunks; ++c) {
    s += partial[(long long)c * nnz + k];
  }
  dw_dense[wflat[k]] = s;
}
