// Low-bit weight-only GEMM kernels for CPUs: shared declarations (no torch headers here, so the
// ISA-specific translation units can be compiled for their instruction set without affecting
// code that runs on every machine).
//
// Prepared weight layout (built once by layout.py):
//   * rows are grouped in tiles of 16 output rows (the last tile zero-padded);
//   * K is padded to Kp, a multiple of 32 (one activation-quantization block);
//   * codes: uint8 [T][Kp/32][block_bytes], each tile's blocks contiguous along K. A block holds
//     the codes of 16 rows × 32 columns as eight "sub-vectors" s = 0..7 of 64 bytes each covering
//     columns 4s..4s+3: byte 4r+j of sub-vector s is the code of row r, column 4s+j, so a 32-bit
//     SIMD lane r holds four consecutive codes of one row (what vpdpbusd multiplies). Bit widths
//     below 8 share bytes between sub-vectors:
//       kU8   512 B: sub-vector s at bytes 64s.
//       kU4   256 B: 64-byte chunk c holds s=2c in the low and s=2c+1 in the high nibbles.
//       kLut4 256 B: as kU4; the nibbles index a 16-entry codebook (nf4/fp4).
//       kU2   128 B: chunk c holds s=4c+i at bits 2i..2i+1.
//       kU3   192 B: chunk c (96 B) = the low two bits as kU2 (64 B), then four little-endian
//             uint64 masks: bit 4r+j of mask i is bit 2 of the code of sub-vector 4c+i.
//   * scale, zero: [T][G][16] (fp16 when exact, else fp32): W[n,k] = (code − zero)·scale for
//     integer kinds; W = table[code]·scale for kLut4 (scale = the block absmax). A constant zero
//     (symmetric codes' offset 2^(b−1), codebooks' 128) is passed as one number instead.
//
// Packed weight (what the ops take): one uint8 tensor, a PackedHeader, then the sections — codes,
// scale, zero, lut (kLut4: uint8 [16], round(S·table) + 128), table (kLut4: float32 [16]) — each at
// a 64-byte-aligned byte offset recorded in the header (layout.py: pack).
//
// Integer path (decode): x is quantized per 32-column block to int8 (symmetric, scale = absmax/127)
// and each block's integer dot product Σ u·q (u = the unsigned code, or the int8-scaled codebook
// entry + 128 for kLut4) is scaled by the block's activation scale. Zero-points are applied once
// per group through the activation sums: Σ (u − z)·x̂ = Σ u·x̂ − z·Σ x̂.
#pragma once

#include <cstdint>

namespace lowbit_cpu {

enum Kind : int { kU8 = 0, kU4 = 1, kU2 = 2, kU3 = 3, kLut4 = 4 };

constexpr int kTileRows = 16;  // output rows per tile: one 32-bit lane of a 512-bit vector each
constexpr int kBlock = 32;     // input columns per activation block

inline int block_bytes(int kind) {
  switch (kind) {
    case kU8: return 512;
    case kU4: case kLut4: return 256;
    case kU3: return 192;
    case kU2: return 128;
    default: return 0;
  }
}

constexpr int64_t kPackedMagic = 0x31574250574f4cLL;  // "LOWPBW1"
constexpr int64_t kPackedHalf = 1;       // flag: scale and zero are fp16 (else fp32)
constexpr int64_t kPackedZeroConst = 2;  // flag: zero is one value, not [T][G][16]

struct PackedHeader {  // 64 bytes, little-endian int64 byte offsets from the start of the tensor
  int64_t magic, codes, scale, zero, lut, table, flags, reserved;
};

// Scales/zero-points of the prepared weight, fp16 (half = true) or fp32, [T][G][16] each; a zero
// that is the same everywhere (symmetric ints, codebooks) is not stored: zero == nullptr, zero_const.
struct GroupParams {
  const void* scale;
  const void* zero;
  bool half;
  float zero_const;
};

// x quantized per 32-column block (like llama.cpp's Q8_0), row-major per input row.
struct QuantizedX {
  const int8_t* q;      // [M][Kp]
  const float* scale;   // [M][nblk]  absmax/127
  const int32_t* sum;   // [M][nblk]  Σ q over the block
  const float* gsum;    // [M][G]     Σ_{b∈g} scale[b]·sum[b]  (the dequantized x summed per group)
};

struct GemmArgs {
  int kind;
  int64_t M, N, Kp, G, bpg;  // bpg: 32-column blocks per group; Kp = G·bpg·32
  const uint8_t* codes;      // [T][tile_bytes]
  int64_t tile_bytes;
  GroupParams gp;
  const uint8_t* lut;        // kLut4: [16] uint8, round(S·table) + 128
  float out_scale;           // kLut4: 1/S (the int8 scaling of the table); 1 otherwise
  QuantizedX x;
  const float* bias;         // [N] or nullptr
  float* y;                  // [M][N]
};

struct DequantArgs {
  int kind;
  int64_t N, K, Kp, G, bpg;
  const uint8_t* codes;
  int64_t tile_bytes;
  GroupParams gp;
  const float* table;  // kLut4: [16] float codebook
  float* out;          // W rows [row0, …) as fp32, row stride K
  int64_t row0;
};

// Each ISA provides the same three functions; gemm/dequant work on tiles [t0, t1).
#define LOWBIT_CPU_DECLARE_ISA(ns)                                                      \
  namespace ns {                                                                        \
  void gemm(const GemmArgs& a, int64_t t0, int64_t t1);                                 \
  void dequant(const DequantArgs& a, int64_t t0, int64_t t1);                           \
  void quantize_x(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale,       \
                  int32_t* sum);                                                        \
  }

LOWBIT_CPU_DECLARE_ISA(scalar)
LOWBIT_CPU_DECLARE_ISA(avx2)       // AVX2 + FMA (maddubs dot products)
LOWBIT_CPU_DECLARE_ISA(avx2_vnni)  // AVX2 + AVX-VNNI (vpdpbusd on 256-bit vectors)
LOWBIT_CPU_DECLARE_ISA(avx512)     // AVX-512 F/BW/VL/DQ + VNNI

#undef LOWBIT_CPU_DECLARE_ISA

}  // namespace lowbit_cpu
