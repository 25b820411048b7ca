// Portable helpers shared by every ISA translation unit (plain C++, no intrinsics).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lowbit_cpu {

// IEEE fp16 bits → float (exact; handles subnormals, inf, nan).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { mant <<= 1; ++e; } while (!(mant & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Scale or zero-point at `index` = (t·G + g)·16 + r (tile t, group g, row r).
inline float group_value(const void* base, bool half, int64_t index) {
  return half ? half_to_float(static_cast<const uint16_t*>(base)[index]) : static_cast<const float*>(base)[index];
}

inline float group_zero(const GroupParams& gp, int64_t index) {
  return gp.zero ? group_value(gp.zero, gp.half, index) : gp.zero_const;
}

// The code of row r, column 4s+j of a 16×32 block (layout in kernels.h).
inline int block_code(int kind, const uint8_t* blk, int s, int r, int j) {
  const int byte = 4 * r + j;
  switch (kind) {
    case kU8: return blk[64 * s + byte];
    case kU4: case kLut4: {
      const uint8_t b = blk[64 * (s / 2) + byte];
      return (s & 1) ? (b >> 4) : (b & 15);
    }
    case kU2: return (blk[64 * (s / 4) + byte] >> (2 * (s % 4))) & 3;
    case kU3: {
      const uint8_t* chunk = blk + 96 * (s / 4);
      uint64_t mask;
      std::memcpy(&mask, chunk + 64 + 8 * (s % 4), 8);
      return ((chunk[byte] >> (2 * (s % 4))) & 3) | (int)(((mask >> byte) & 1) << 2);
    }
    default: return 0;
  }
}

// Symmetric int8 quantization of one 32-column block (columns ≥ valid are zero padding).
inline void quantize_block(const float* x, int64_t valid, int8_t* q, float* scale, int32_t* sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < valid; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t s = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    const int32_t v = i < valid ? (int32_t)std::nearbyint(x[i] * inv) : 0;
    q[i] = (int8_t)v;
    s += v;
  }
  *scale = amax / 127.f;
  *sum = s;
}

inline void quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t b = 0; b * kBlock < Kp; ++b) {
    const int64_t k0 = b * kBlock;
    const int64_t valid = K - k0 < kBlock ? (K - k0 > 0 ? K - k0 : 0) : kBlock;
    quantize_block(x + k0, valid, q + k0, scale + b, sum + b);
  }
}

}  // namespace lowbit_cpu
