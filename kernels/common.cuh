// Shared helpers of the sparsecore CUDA kernels.
//
// Every kernel here works on one formulation (see gather.cu): a sparse row (one output channel
// of a convolution, one output unit of a linear layer) is a list of (weight, input offset)
// entries, and output position t of that row reads its input at `offset + base(t)`.
#pragma once

// Entries of a row are staged in shared memory in tiles of this many.
#define SC_ENTRY_TILE 256
// Largest block the kernels are written for (the host never launches more).
#define SC_MAX_THREADS 256
#define SC_MAX_WARPS (SC_MAX_THREADS / 32)

// One staged entry: the weight value and its (already scaled) input offset, read together.
struct ScEntry {
  float value;
  int offset;
};

__device__ __forceinline__ float sc_warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, d);
  }
  return v;
}

// Stage entries [begin, begin + count) of a row. The value is gathered from the dense weight
// through its flat position, so the kernels always see the weight as it is now.
__device__ __forceinline__ void sc_stage_entries(ScEntry* tile, const float* __restrict__ weight,
                                                 const long long* __restrict__ wflat,
                                                 const int* __restrict__ offsets, int off_scale,
                                                 int begin, int count) {
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    ScEntry e;
    e.value = weight[wflat[begin + j]];
    e.offset = offsets[begin + j] * off_scale;
    tile[j] = e;
  }
}

__device__ __forceinline__ void sc_stage_offsets(int* tile, const int* __restrict__ offsets,
                                                 int off_scale, int begin, int count) {
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    tile[j] = offsets[begin + j] * off_scale;
  }
}

// Position t (flattened over n, p, q) of a row: where its input window starts and where its
// output lives. Returns false past the end.
struct ScPosition {
  long long input;   // element offset of the window in the input (group base not included)
  long long output;  // element offset of the output value
};

__device__ __forceinline__ bool sc_position(long long t, long long total, long long pq, int Q,
                                            int row, int rows, long long in_batch_stride,
                                            int row_step, int col_step, ScPosition* pos) {
  if (t >= total) {
    return false;
  }
  const long long n = t / pq;
  const long long rem = t - n * pq;
  const long long p = rem / Q;
  const long long q = rem - p * Q;
  pos->input = n * in_batch_stride + p * row_step + q * col_step;
  pos->output = (n * rows + row) * pq + rem;
  return true;
}
