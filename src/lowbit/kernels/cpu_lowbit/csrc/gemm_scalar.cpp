// Portable scalar kernels: the executable specification of the prepared layout (kernels.h) and
// the fallback for CPUs without AVX2. Same integer arithmetic as the SIMD paths.
#include <algorithm>
#include <vector>

#include "common.h"

namespace lowbit_cpu {
namespace scalar {

void quantize_x(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale, int32_t* sum) {
  quantize_row(x, K, Kp, q, scale, sum);
}

namespace {

// One 16×32 block's codes as bytes (kLut4: looked up); KIND constant so block_code's switch folds.
template <int KIND>
void decode_block(const uint8_t* blk, const uint8_t* lut, uint8_t (&codes)[kTileRows][kBlock]) {
  for (int r = 0; r < kTileRows; ++r)
    for (int c = 0; c < kBlock; ++c) {
      const int u = block_code(KIND, blk, c / 4, r, c % 4);
      codes[r][c] = (uint8_t)(KIND == kLut4 ? lut[u] : u);
    }
}

void decode_block(int kind, const uint8_t* blk, const uint8_t* lut, uint8_t (&codes)[kTileRows][kBlock]) {
  switch (kind) {
    case kU8: return decode_block<kU8>(blk, lut, codes);
    case kU4: return decode_block<kU4>(blk, lut, codes);
    case kU2: return decode_block<kU2>(blk, lut, codes);
    case kU3: return decode_block<kU3>(blk, lut, codes);
    default: return decode_block<kLut4>(blk, lut, codes);
  }
}

}  // namespace

void gemm(const GemmArgs& a, int64_t t0, int64_t t1) {
  const int bb = block_bytes(a.kind);
  const int64_t nblk = a.Kp / kBlock;
  std::vector<float> acc(a.M * kTileRows), gacc(a.M * kTileRows);  // [m][r]
  uint8_t codes[kTileRows][kBlock];  // one block, decoded (kLut4: looked up) once for all rows of x
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* blk = a.codes + t * a.tile_bytes;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < a.G; ++g) {
      std::fill(gacc.begin(), gacc.end(), 0.f);
      for (int64_t b = g * a.bpg; b < (g + 1) * a.bpg; ++b, blk += bb) {
        decode_block(a.kind, blk, a.lut, codes);
        for (int64_t m = 0; m < a.M; ++m) {
          const int8_t* xq = a.x.q + m * a.Kp + b * kBlock;
          const float xs = a.x.scale[m * nblk + b];
          for (int r = 0; r < kTileRows; ++r) {
            int32_t dot = 0;
            for (int c = 0; c < kBlock; ++c) dot += (int32_t)codes[r][c] * xq[c];
            gacc[m * kTileRows + r] += (float)dot * xs;
          }
        }
      }
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t gi = (t * a.G + g) * kTileRows + r;
        const float ws = group_value(a.gp.scale, a.gp.half, gi);
        const float wz = ws * group_zero(a.gp, gi);
        for (int64_t m = 0; m < a.M; ++m)
          acc[m * kTileRows + r] += gacc[m * kTileRows + r] * ws - wz * a.x.gsum[m * a.G + g];
      }
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int r = 0; r < kTileRows && t * kTileRows + r < a.N; ++r) {
        const int64_t n = t * kTileRows + r;
        a.y[m * a.N + n] = acc[m * kTileRows + r] * a.out_scale + (a.bias ? a.bias[n] : 0.f);
      }
  }
}

void dequant(const DequantArgs& a, int64_t t0, int64_t t1) {
  const int bb = block_bytes(a.kind);
  const int64_t group = a.bpg * kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = a.codes + t * a.tile_bytes;
    for (int r = 0; r < kTileRows && t * kTileRows + r < a.N; ++r) {
      float* out = a.out + (t * kTileRows + r - a.row0) * a.K;
      for (int64_t k = 0; k < a.K; ++k) {
        const int64_t b = k / kBlock, col = k % kBlock;
        const int code = block_code(a.kind, tile + b * bb, (int)(col / 4), r, (int)(col % 4));
        const int64_t gi = (t * a.G + k / group) * kTileRows + r;
        const float ws = group_value(a.gp.scale, a.gp.half, gi);
        out[k] = a.kind == kLut4 ? a.table[code] * ws
                                 : ((float)code - group_zero(a.gp, gi)) * ws;
      }
    }
  }
}

}  // namespace scalar
}  // namespace lowbit_cpu
