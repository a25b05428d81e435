// CPU backend and schema of the SimmimMask DALI operator (see simmim_mask_op.h).
#include <cstdint>
#include <vector>

#include "simmim_mask_op.h"

namespace simmim_fast {

namespace {

/// One sample's coarse mask (rand_size^2 bytes) into `coarse`.
void CoarseMaskCpu(const mask::Geometry &g, uint64_t key, uint8_t *coarse,
                   std::vector<uint64_t> &keys, std::vector<int> &scratch) {
  const int T = g.token_count();
  switch (g.strategy) {
    case mask::kRandom:
      keys.resize(T);
      for (int i = 0; i < T; ++i) keys[i] = mask::cell_key(key, i);
      for (int i = 0; i < T; ++i)
        coarse[i] = mask::random_cell_masked(keys.data(), T, g.mask_count, i) ? 1 : 0;
      break;
    case mask::kSquare:
      mask::square_coarse(g.rand_size, g.mask_count, coarse);
      break;
    default: {
      scratch.resize(T);
      mask::Stream rng(key);
      mask::block_coarse(g.rand_size, g.mask_count, rng, coarse, scratch.data());
    }
  }
}

}  // namespace

template <>
void SimmimMask<::dali::CPUBackend>::RunImpl(::dali::Workspace &ws) {
  auto &output = ws.Output<::dali::CPUBackend>(0);
  output.SetLayout("HW");
  const int n = output.num_samples();
  const mask::Geometry g = geometry_;
  const uint64_t seed = seed_, iteration = iteration_;
  auto &tp = ws.GetThreadPool();
  for (int s = 0; s < n; ++s) {
    tp.AddWork([&, s](int) {
      std::vector<uint8_t> coarse(g.token_count());
      std::vector<uint64_t> keys;
      std::vector<int> scratch;
      CoarseMaskCpu(g, mask::sample_key(seed, iteration, s), coarse.data(), keys, scratch);
      uint8_t *out = output.mutable_tensor<uint8_t>(s);
      const int GG = g.grid_size() * g.grid_size();
      for (int p = 0; p < GG; ++p) out[p] = mask::grid_value(g, coarse.data(), p);
    });
  }
  tp.RunAll();
  ++iteration_;
}

}  // namespace simmim_fast

DALI_REGISTER_OPERATOR(SimmimMask, ::simmim_fast::SimmimMask<::dali::CPUBackend>, ::dali::CPU);

DALI_SCHEMA(SimmimMask)
    .DocStr(R"(Generates SimMIM masks (simmim-fast native operator).

One uint8 ``(grid_size, grid_size)`` mask per sample (layout ``HW``, 1 = masked), with
``grid_size = input_size // model_patch_size``: exactly ``mask_count`` cells of the
``(input_size // mask_patch_size)``-square mask grid are masked, each a constant
``(mask_patch_size // model_patch_size)``-square block. Same semantics as
``simmim_fast.MaskGenerator``; the CPU and GPU backends produce identical masks for the same seed.)")
    .NumInput(0)
    .NumOutput(1)
    .AddOptionalArg("input_size", "Image side in pixels.", 192)
    .AddOptionalArg("mask_patch_size", "Side of one mask cell in pixels; divides `input_size`.", 32)
    .AddOptionalArg("model_patch_size",
                    "Side of one model patch in pixels; divides `mask_patch_size`.", 4)
    .AddOptionalArg("mask_ratio", "Fraction of mask cells to mask, in [0, 1].", 0.6f)
    .AddOptionalArg("mask_count",
                    "Exact number of masked cells; -1 (default): ceil(cells * mask_ratio).", -1)
    .AddOptionalArg("strategy", "Masking strategy: 'random' (official), 'square' or 'block'.",
                    std::string("random"))
    .AddRandomSeedArg();
