// GPU backend of the SimmimMask DALI operator (see simmim_mask_op.h): one thread block per
// sample. Same algorithm and random numbers as the CPU backend (simmim_mask_core.h), so both
// backends give identical masks for the same seed.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "dali/core/cuda_error.h"
#include "simmim_mask_op.h"

namespace simmim_fast {

namespace {

constexpr int kThreads = 256;
// dynamic shared memory: T keys (uint64; reused as T int scratch by 'block') + T coarse bytes
constexpr int kMaxSharedBytes = 48 * 1024;

inline size_t SharedBytes(const mask::Geometry &g) {
  const size_t T = static_cast<size_t>(g.token_count());
  return T * sizeof(uint64_t) + T;
}

/// Masks of samples [first, first + gridDim.x); sample `first + blockIdx.x` is written at
/// out + blockIdx.x * grid^2.
__global__ void SimmimMaskKernel(uint8_t *out, mask::Geometry g, uint64_t seed,
                                 uint64_t iteration, int first) {
  extern __shared__ uint64_t smem[];
  const int T = g.token_count();
  uint64_t *keys = smem;
  int *scratch = reinterpret_cast<int *>(smem);
  uint8_t *coarse = reinterpret_cast<uint8_t *>(smem + T);
  const int sample = first + static_cast<int>(blockIdx.x);
  const uint64_t key = mask::sample_key(seed, iteration, static_cast<uint64_t>(sample));

  if (g.strategy == mask::kRandom) {
    for (int i = threadIdx.x; i < T; i += blockDim.x) keys[i] = mask::cell_key(key, i);
    __syncthreads();
    for (int i = threadIdx.x; i < T; i += blockDim.x)
      coarse[i] = mask::random_cell_masked(keys, T, g.mask_count, i) ? 1 : 0;
  } else if (threadIdx.x == 0) {
    if (g.strategy == mask::kSquare) {
      mask::square_coarse(g.rand_size, g.mask_count, coarse);
    } else {
      mask::Stream rng(key);
      mask::block_coarse(g.rand_size, g.mask_count, rng, coarse, scratch);
    }
  }
  __syncthreads();

  const int GG = g.grid_size() * g.grid_size();
  uint8_t *dst = out + static_cast<size_t>(blockIdx.x) * GG;
  for (int p = threadIdx.x; p < GG; p += blockDim.x) dst[p] = mask::grid_value(g, coarse, p);
}

}  // namespace

template <>
void SimmimMask<::dali::GPUBackend>::RunImpl(::dali::Workspace &ws) {
  auto &output = ws.Output<::dali::GPUBackend>(0);
  output.SetLayout("HW");
  const int n = output.num_samples();
  const size_t smem = SharedBytes(geometry_);
  DALI_ENFORCE(smem <= static_cast<size_t>(kMaxSharedBytes),
               "SimmimMask (gpu): the mask grid has " + std::to_string(geometry_.token_count()) +
                   " cells; the GPU backend supports at most " +
                   std::to_string(kMaxSharedBytes / 9) +
                   " (input_size // mask_patch_size too large); use device='cpu'");
  if (n == 0) {
    ++iteration_;
    return;
  }
  cudaStream_t stream = ws.stream();
  if (output.IsContiguous()) {
    auto *base = static_cast<uint8_t *>(output.raw_mutable_tensor(0));
    SimmimMaskKernel<<<n, kThreads, smem, stream>>>(base, geometry_, seed_, iteration_, 0);
  } else {
    for (int s = 0; s < n; ++s) {
      auto *dst = output.mutable_tensor<uint8_t>(s);
      SimmimMaskKernel<<<1, kThreads, smem, stream>>>(dst, geometry_, seed_, iteration_, s);
    }
  }
  CUDA_CALL(cudaGetLastError());
  ++iteration_;
}

}  // namespace simmim_fast

DALI_REGISTER_OPERATOR(SimmimMask, ::simmim_fast::SimmimMask<::dali::GPUBackend>, ::dali::GPU);
