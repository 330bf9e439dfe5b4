// Sparse gather products: the forward pass of sparse conv2d and linear layers, and their input
// gradients (through the transposed structure).
//
// Formulation. An input x holds n_batch images; image n starts at n * in_batch_stride and group g
// of it at g * in_group_stride. A sparse row `row` (group row / rows_per_group) has entries
// k = indptr[row] .. indptr[row+1]-1, each a weight weight[wflat[k]] and an input offset
// offsets[k] * off_scale. Its output has P x Q positions per image:
//
//   y[n, row, p, q] = bias[row] + sum_k weight[wflat[k]]
//                         * x[n*in_batch_stride + g*in_group_stride + offsets[k]*off_scale
//                             + p*row_step + q*col_step]
//
// * conv2d forward: x is the zero-padded input (N, C, Hp, Wp), rows are output channels,
//   offsets = c*Hp*Wp + r*dil_h*Wp + s*dil_w, row_step = stride_h*Wp, col_step = stride_w.
// * conv2d input gradient: x is the (dilated, padded) output gradient, rows are input channels,
//   offsets come from the transposed structure with the kernel flipped, row_step = Wf, col_step = 1.
// * linear forward / input gradient: x is the activation transposed to (features, batch), one
//   "image" with P = 1 and Q = batch, offsets are feature indices and off_scale = batch, so
//   consecutive threads read consecutive batch columns (coalesced).
//
// Grid: blockIdx.x walks rows in row_order (longest rows first: load balance), blockIdx.y walks
// chunks of blockDim.x * VPT positions. Positions of a chunk are consecutive, so neighbouring
// threads read neighbouring input elements, and blocks running at the same time share images
// in L2. No atomics: every output is written by exactly one thread, so results are
// deterministic.
#include "common.cuh"

template <int VPT>
__device__ __forceinline__ void sc_gather_scalar(
    const float* __restrict__ x, const float* __restrict__ weight,
    const long long* __restrict__ wflat, const int* __restrict__ offsets, int off_scale,
    const int* __restrict__ indptr, const int* __restrict__ row_order,
    const float* __restrict__ bias, int has_bias, float* __restrict__ y, int n_batch, int rows,
    int rows_per_group, long long in_batch_stride, long long in_group_stride, int P, int Q,
    int row_step, int col_step) {
  __shared__ ScEntry tile[SC_ENTRY_TILE];
  const int row = row_order[blockIdx.x];
  const int begin = indptr[row];
  const int end = indptr[row + 1];
  const long long pq = (long long)P * Q;
  const long long total = (long long)n_batch * pq;
  const long long span = (long long)blockDim.x * VPT;
  const float b = has_bias ? bias[row] : 0.0f;
  const float* xg = x + (long long)(row / rows_per_group) * in_group_stride;

  for (long long chunk = blockIdx.y; chunk * span < total; chunk += gridDim.y) {
    const float* src[VPT];
    long long dst[VPT];
    float acc[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      ScPosition pos;
      const long long t = chunk * span + threadIdx.x + (long long)i * blockDim.x;
      acc[i] = 0.0f;
      if (sc_position(t, total, pq, Q, row, rows, in_batch_stride, row_step, col_step, &pos)) {
        src[i] = xg + pos.input;
        dst[i] = pos.output;
      } else {
        src[i] = xg;  // a valid address; the result is dropped
        dst[i] = -1;
      }
    }
    for (int k0 = begin; k0 < end; k0 += SC_ENTRY_TILE) {
      const int count = min(SC_ENTRY_TILE, end - k0);
      __syncthreads();
      sc_stage_entries(tile, weight, wflat, offsets, off_scale, k0, count);
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < count; ++j) {
        const ScEntry e = tile[j];
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          acc[i] = fmaf(e.value, __ldg(src[i] + e.offset), acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (dst[i] >= 0) {
        y[dst[i]] = acc[i] + b;
      }
    }
  }
}

// Vector variant: each position is a quad of 4 consecutive q, read with one float4 load. The
// host uses it only when col_step == 1, Q % 4 == 0 and every base, stride and scaled offset is
// a multiple of 4 elements (linear layers with a batch that is a multiple of 4).
template <int VPT>
__device__ __forceinline__ void sc_gather_vec4(
    const float* __restrict__ x, const float* __restrict__ weight,
    const long long* __restrict__ wflat, const int* __restrict__ offsets, int off_scale,
    const int* __restrict__ indptr, const int* __restrict__ row_order,
    const float* __restrict__ bias, int has_bias, float* __restrict__ y, int n_batch, int rows,
    int rows_per_group, long long in_batch_stride, long long in_group_stride, int P, int Q,
    int row_step) {
  __shared__ ScEntry tile[SC_ENTRY_TILE];
  const int row = row_order[blockIdx.x];
  const int begin = indptr[row];
  const int end = indptr[row + 1];
  const int Q4 = Q / 4;
  const long long pq4 = (long long)P * Q4;
  const long long total = (long long)n_batch * pq4;
  const long long span = (long long)blockDim.x * VPT;
  const float b = has_bias ? bias[row] : 0.0f;
  const float* xg = x + (long long)(row / rows_per_group) * in_group_stride;

  for (long long chunk = blockIdx.y; chunk * span < total; chunk += gridDim.y) {
    const float* src[VPT];
    long long dst[VPT];
    float4 acc[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      ScPosition pos;
      const long long t = chunk * span + threadIdx.x + (long long)i * blockDim.x;
      acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      // Quad t is position 4*t of the scalar layout with a quarter of Q; scale back.
      if (sc_position(t, total, pq4, Q4, row, rows, in_batch_stride, row_step, 4, &pos)) {
        src[i] = xg + pos.input;
        const long long n = t / pq4;
        const long long rem4 = t - n * pq4;
        dst[i] = (n * rows + row) * (pq4 * 4) + rem4 * 4;
      } else {
        src[i] = xg;
        dst[i] = -1;
      }
    }
    for (int k0 = begin; k0 < end; k0 += SC_ENTRY_TILE) {
      const int count = min(SC_ENTRY_TILE, end - k0);
      __syncthreads();
      sc_stage_entries(tile, weight, wflat, offsets, off_scale, k0, count);
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < count; ++j) {
        const ScEntry e = tile[j];
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const float4 v = __ldg(reinterpret_cast<const float4*>(src[i] + e.offset));
          acc[i].x = fmaf(e.value, v.x, acc[i].x);
          acc[i].y = fmaf(e.value, v.y, acc[i].y);
          acc[i].z = fmaf(e.value, v.z, acc[i].z);
          acc[i].w = fmaf(e.value, v.w, acc[i].w);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (dst[i] >= 0) {
        const float4 out = make_float4(acc[i].x + b, acc[i].y + b, acc[i].z + b, acc[i].w + b);
        *reinterpret_cast<float4*>(y + dst[i]) = out;
      }
    }
  }
}

#define SC_GATHER_PARAMS                                                                       \
  const float *__restrict__ x, const float *__restrict__ weight,                               \
      const long long *__restrict__ wflat, const int *__restrict__ offsets, int off_scale,     \
      const int *__restrict__ indptr, const int *__restrict__ row_order,                       \
      const float *__restrict__ bias, int has_bias, float *__restrict__ y, int n_batch,        \
      int rows, int rows_per_group, long long in_batch_stride, long long in_group_stride,      \
      int P, int Q, int row_step, int col_step

#define SC_GATHER_ARGS                                                                        \
  x, weight, wflat, offsets, off_scale, indptr, row_order, bias, has_bias, y, n_batch, rows,  \
      rows_per_group, in_batch_stride, in_group_stride, P, Q, row_step

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_gather_f32_v1(SC_GATHER_PARAMS) {
  sc_gather_scalar<1>(SC_GATHER_ARGS, col_step);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_gather_f32_v2(SC_GATHER_PARAMS) {
  sc_gather_scalar<2>(SC_GATHER_ARGS, col_step);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_gather_f32_v4(SC_GATHER_PARAMS) {
  sc_gather_scalar<4>(SC_GATHER_ARGS, col_step);
}

// col_step is part of the common signature; the vector kernels require it to be 1.
extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_gather_f32_q1(SC_GATHER_PARAMS) {
  (void)col_step;
  sc_gather_vec4<1>(SC_GATHER_ARGS);
}

extern "C" __global__ void __launch_bounds__(SC_MAX_THREADS) sc_gather_f32_q2(SC_GATHER_PARAMS) {
  (void)col_step;
  sc_gather_vec4<2>(SC_GATHER_ARGS);
}
