// SimmimMask: a DALI operator (CPU and GPU backends) that generates SimMIM masks inside the
// pipeline. Python: nvidia.dali.fn.simmim_mask(...) once the plugin is loaded.
//
// No inputs; one output per sample: uint8 (grid_size, grid_size), layout "HW", 1 = masked.
// Arguments mirror simmim_fast.MaskGenerator: input_size, mask_patch_size, model_patch_size,
// mask_ratio (or an exact mask_count), strategy ("random", "square", "block"), seed (taken from
// the pipeline seed when not given).
#ifndef SIMMIM_FAST_KERNELS_SIMMIM_MASK_OP_H_
#define SIMMIM_FAST_KERNELS_SIMMIM_MASK_OP_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dali/core/tensor_shape.h"
#include "dali/pipeline/operator/operator.h"
#include "simmim_mask_core.h"

namespace simmim_fast {

inline mask::Geometry ParseMaskGeometry(const ::dali::OpSpec &spec) {
  const int input_size = spec.GetArgument<int>("input_size");
  const int mask_patch = spec.GetArgument<int>("mask_patch_size");
  const int model_patch = spec.GetArgument<int>("model_patch_size");
  const float ratio = spec.GetArgument<float>("mask_ratio");
  const int count_arg = spec.GetArgument<int>("mask_count");
  const std::string strategy = spec.GetArgument<std::string>("strategy");
  DALI_ENFORCE(input_size >= 1, "SimmimMask: `input_size` must be >= 1, got " + std::to_string(input_size));
  DALI_ENFORCE(mask_patch >= 1,
               "SimmimMask: `mask_patch_size` must be >= 1, got " + std::to_string(mask_patch));
  DALI_ENFORCE(model_patch >= 1,
               "SimmimMask: `model_patch_size` must be >= 1, got " + std::to_string(model_patch));
  DALI_ENFORCE(input_size % mask_patch == 0,
               "SimmimMask: `input_size` (" + std::to_string(input_size) +
                   ") must be divisible by `mask_patch_size` (" + std::to_string(mask_patch) + ")");
  DALI_ENFORCE(mask_patch % model_patch == 0,
               "SimmimMask: `mask_patch_size` (" + std::to_string(mask_patch) +
                   ") must be divisible by `model_patch_size` (" + std::to_string(model_patch) + ")");
  mask::Geometry g;
  g.rand_size = input_size / mask_patch;
  g.scale = mask_patch / model_patch;
  const int T = g.token_count();
  if (count_arg >= 0) {
    DALI_ENFORCE(count_arg <= T, "SimmimMask: `mask_count` must be in [0, " + std::to_string(T) +
                                     "] (cells of the mask grid), got " + std::to_string(count_arg));
    g.mask_count = count_arg;
  } else {
    DALI_ENFORCE(ratio >= 0.f && ratio <= 1.f,
                 "SimmimMask: `mask_ratio` must be in [0, 1], got " + std::to_string(ratio));
    // The official formula in double; note `mask_ratio` arrives as float32 (pass `mask_count`
    // for an exact match with a float64 ratio; the Python wrapper does).
    g.mask_count = static_cast<int>(std::ceil(static_cast<double>(T) * static_cast<double>(ratio)));
    if (g.mask_count > T) g.mask_count = T;
  }
  if (strategy == "random") {
    g.strategy = mask::kRandom;
  } else if (strategy == "square") {
    g.strategy = mask::kSquare;
  } else if (strategy == "block") {
    g.strategy = mask::kBlock;
  } else {
    DALI_FAIL("SimmimMask: `strategy` must be one of 'random', 'square', 'block'; got '" + strategy +
              "'");
  }
  return g;
}

template <typename Backend>
class SimmimMask : public ::dali::Operator<Backend> {
 public:
  explicit SimmimMask(const ::dali::OpSpec &spec)
      : ::dali::Operator<Backend>(spec),
        geometry_(ParseMaskGeometry(spec)),
        seed_(static_cast<uint64_t>(spec.GetArgument<int64_t>("seed"))) {}

  ~SimmimMask() override = default;
  SimmimMask(const SimmimMask &) = delete;
  SimmimMask &operator=(const SimmimMask &) = delete;

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const int n = ws.GetRequestedBatchSize(0);
    const int64_t G = geometry_.grid_size();
    output_desc.resize(1);
    output_desc[0].shape = ::dali::uniform_list_shape(n, ::dali::TensorShape<2>{G, G});
    output_desc[0].type = DALI_UINT8;
    return true;  // DALI allocates the outputs
  }

  void RunImpl(::dali::Workspace &ws) override;

  mask::Geometry geometry_;
  uint64_t seed_;
  uint64_t iteration_ = 0;  // batches produced so far; part of every sample's key
};

}  // namespace simmim_fast

#endif  // SIMMIM_FAST_KERNELS_SIMMIM_MASK_OP_H_
