// SimMIM mask generation shared by the CPU (.cc) and CUDA (.cu) backends of the SimmimMask DALI
// operator. Everything here is plain C++17 that nvcc also compiles for the device, so both backends
// draw exactly the same masks for the same (seed, iteration, sample).
//
// Resolutions (defaults: 192 px input, 32 px mask cells, 4 px model patches), as in
// simmim_fast/data/masking.py:
//   coarse grid (rand_size, rand_size)  one cell per mask patch      6 x 6
//   model grid  (grid_size, grid_size)  one cell per model patch    48 x 48
//   grid_size = rand_size * scale
//
// Every strategy masks exactly mask_count coarse cells; each coarse cell becomes a constant
// scale x scale block of the model grid. 1 = masked.
//
// Random numbers: a counter-based generator (splitmix64 finaliser over (key, counter)), so a
// sample's mask depends only on (seed, iteration, sample index), never on thread scheduling.
// The sequences differ from numpy's; the distributions are the same as MaskGenerator's:
//   random: the mask_count cells with the smallest 64-bit keys (a uniformly random subset);
//   square: deterministic, same cells as MaskGenerator._square;
//   block:  the algorithm of MaskGenerator._block (BEiT-style rectangles).
#ifndef SIMMIM_FAST_KERNELS_SIMMIM_MASK_CORE_H_
#define SIMMIM_FAST_KERNELS_SIMMIM_MASK_CORE_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SIMMIM_HD __host__ __device__ inline
#else
#define SIMMIM_HD inline
#endif

namespace simmim_fast {
namespace mask {

enum Strategy : int { kRandom = 0, kSquare = 1, kBlock = 2 };

// BEiT-style block parameters, as in masking.py
constexpr double kBlockMinAspect = 0.3;
constexpr int kBlockMaxFails = 100;

struct Geometry {
  int rand_size = 0;   // mask cells per side
  int scale = 0;       // model cells per mask cell side
  int mask_count = 0;  // coarse cells to mask, 0 <= mask_count <= rand_size^2
  int strategy = kRandom;

  SIMMIM_HD int token_count() const { return rand_size * rand_size; }
  SIMMIM_HD int grid_size() const { return rand_size * scale; }
};

SIMMIM_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Key of one sample: batch `iteration` of an operator seeded with `seed`, sample `sample`.
SIMMIM_HD uint64_t sample_key(uint64_t seed, uint64_t iteration, uint64_t sample) {
  return mix64(mix64(mix64(seed) + iteration) + sample);
}

/// Random key of coarse cell `cell` (random strategy).
SIMMIM_HD uint64_t cell_key(uint64_t key, int cell) {
  return mix64(key ^ mix64(0xC0FFEE0000000000ull + static_cast<uint64_t>(cell)));
}

/// Counter-based stream of random numbers for one sample (block strategy).
struct Stream {
  uint64_t key;
  uint64_t ctr;
  SIMMIM_HD explicit Stream(uint64_t k) : key(k), ctr(0) {}
  SIMMIM_HD uint64_t next() { return mix64(key + 0xD1B54A32D192ED03ull * (++ctr)); }
  /// uniform in [0, 1) with 53 random bits
  SIMMIM_HD double uniform01() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  /// uniform in [lo, hi) (lo when lo == hi), like numpy's Generator.uniform
  SIMMIM_HD double uniform(double lo, double hi) { return lo + (hi - lo) * uniform01(); }
  /// uniform integer in [0, n), n >= 1
  SIMMIM_HD int below(int n) {
    return static_cast<int>(((next() >> 32) * static_cast<uint64_t>(n)) >> 32);
  }
};

/// True when cell i is among the mask_count cells with the smallest (key, index) pairs.
SIMMIM_HD bool random_cell_masked(const uint64_t *keys, int token_count, int mask_count, int i) {
  const uint64_t ki = keys[i];
  int rank = 0;
  for (int j = 0; j < token_count && rank < mask_count; ++j) {
    const uint64_t kj = keys[j];
    rank += (kj < ki) || (kj == ki && j < i);
  }
  return rank < mask_count;
}

SIMMIM_HD int isqrt(int n) {
  int s = static_cast<int>(sqrt(static_cast<double>(n)));
  while (s > 0 && s * s > n) --s;
  while ((s + 1) * (s + 1) <= n) ++s;
  return s;
}

/// MaskGenerator._square: a centred square of isqrt(n)^2 cells, the rest along the ring outside it
/// (column right of the square top to bottom, the corner, the row below right to left).
SIMMIM_HD void square_coarse(int R, int n, uint8_t *coarse) {
  for (int i = 0; i < R * R; ++i) coarse[i] = 0;
  const int side = isqrt(n);
  const int o = (R - side) / 2;
  for (int r = 0; r < side; ++r)
    for (int c = 0; c < side; ++c) coarse[(o + r) * R + (o + c)] = 1;
  const int rest = n - side * side;  // <= 2 * side, and then side < R
  for (int k = 0; k < rest; ++k) {
    int r, c;
    if (k < side) {
      r = o + k;
      c = o + side;
    } else if (k == side) {
      r = o + side;
      c = o + side;
    } else {
      r = o + side;
      c = o + side - 1 - (k - side - 1);
    }
    coarse[r * R + c] = 1;
  }
}

/// Moves `k` uniformly chosen entries of idx[0..n) to idx[0..k) (partial Fisher-Yates).
SIMMIM_HD void choose_subset(int *idx, int n, int k, Stream &rng) {
  for (int i = 0; i < k; ++i) {
    const int j = i + rng.below(n - i);
    const int t = idx[i];
    idx[i] = idx[j];
    idx[j] = t;
  }
}

/// MaskGenerator._block. `scratch` holds at least R*R ints.
SIMMIM_HD void block_coarse(int R, int target, Stream &rng, uint8_t *coarse, int *scratch) {
  const int T = R * R;
  for (int i = 0; i < T; ++i) coarse[i] = 0;
  const int min_cells = T >= 16 ? 4 : 1;
  const double log_lo = log(kBlockMinAspect), log_hi = log(1.0 / kBlockMinAspect);
  int count = 0, fails = 0;
  while (count < target) {
    const int rem = target - count;
    if (fails >= kBlockMaxFails) {  // give up on rectangles: the rest uniformly among free cells
      int nfree = 0;
      for (int i = 0; i < T; ++i)
        if (!coarse[i]) scratch[nfree++] = i;
      choose_subset(scratch, nfree, rem, rng);
      for (int k = 0; k < rem; ++k) coarse[scratch[k]] = 1;
      break;
    }
    const double lo = static_cast<double>(min_cells < rem ? min_cells : rem);
    const double area = rng.uniform(lo, static_cast<double>(rem));
    const double aspect = exp(rng.uniform(log_lo, log_hi));
    int h = static_cast<int>(rint(sqrt(area * aspect)));
    int w = static_cast<int>(rint(sqrt(area / aspect)));
    h = h < 1 ? 1 : (h > R ? R : h);
    w = w < 1 ? 1 : (w > R ? R : w);
    const int top = rng.below(R - h + 1);
    const int left = rng.below(R - w + 1);
    int nnew = 0;
    for (int r = top; r < top + h; ++r)
      for (int c = left; c < left + w; ++c)
        if (!coarse[r * R + c]) scratch[nnew++] = r * R + c;
    if (nnew == 0) {
      ++fails;
      continue;
    }
    fails = 0;
    if (nnew > rem) {
      choose_subset(scratch, nnew, rem, rng);
      nnew = rem;
    }
    for (int k = 0; k < nnew; ++k) coarse[scratch[k]] = 1;
    count += nnew;
  }
}

/// Nearest upsampling of the coarse mask to the model grid: out is (grid, grid), row-major.
SIMMIM_HD uint8_t grid_value(const Geometry &g, const uint8_t *coarse, int pixel) {
  const int G = g.grid_size();
  const int r = (pixel / G) / g.scale, c = (pixel % G) / g.scale;
  return coarse[r * g.rand_size + c];
}

}  // namespace mask
}  // namespace simmim_fast

#endif  // SIMMIM_FAST_KERNELS_SIMMIM_MASK_CORE_H_
