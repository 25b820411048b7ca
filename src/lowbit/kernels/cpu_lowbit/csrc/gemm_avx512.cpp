// AVX-512 (F/BW/VL/DQ + VNNI) kernels. One 512-bit vector holds a 16-row × 4-column sub-vector
// of codes (kernels.h): lane r accumulates output row r, so vpdpbusd(u8 codes, broadcast 4 int8
// activations) needs no horizontal reductions. Compiled for AVX-512 via a target pragma and only
// called after a runtime CPU check.
#if defined(__x86_64__) || defined(__i386__)  // other architectures build only the scalar kernels
#include <immintrin.h>

#include <algorithm>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#define LOWBIT_INLINE inline __attribute__((always_inline))

namespace lowbit_cpu {
namespace avx512 {
namespace {

// Software prefetch distance on the code stream (bytes). The hardware prefetchers alone leave a
// core short of memory-level parallelism when there are many instructions per byte (int4: ~8 per
// 64 bytes); 4 KiB ahead measured 5-15 % faster for int4 GEMVs on Zen 5 and neutral for int8.
constexpr int kPrefetch = 4096;

constexpr int block_size(int kind) {
  return kind == kU8 ? 512 : kind == kU2 ? 128 : kind == kU3 ? 192 : 256;
}

// acc += vpdpbusd(w, four int8 activations at p broadcast to every 32-bit lane). Written in asm so
// the broadcast is an embedded memory operand ({1to16}): GCC otherwise emits a separate
// vpbroadcastd per dot product, which competes with vpdpbusd for the vector pipes.
LOWBIT_INLINE __m512i dot_broadcast(__m512i acc, __m512i w, const int8_t* p) {
  __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*(const int32_t*)p));
  return acc;
}

// Sub-vector s (16 rows × columns 4s..4s+3) of a block as unsigned bytes (kLut4: looked up).
template <int KIND>
LOWBIT_INLINE __m512i sub_vector(const uint8_t* blk, int s, __m512i lut) {
  if constexpr (KIND == kU8) {
    return _mm512_loadu_si512(blk + 64 * s);
  } else if constexpr (KIND == kU4 || KIND == kLut4) {
    __m512i v = _mm512_loadu_si512(blk + 64 * (s / 2));
    if (s & 1) v = _mm512_srli_epi16(v, 4);
    v = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    if constexpr (KIND == kLut4) v = _mm512_shuffle_epi8(lut, v);
    return v;
  } else if constexpr (KIND == kU2) {
    const __m512i v = _mm512_loadu_si512(blk + 64 * (s / 4));
    return _mm512_and_si512(_mm512_srli_epi16(v, 2 * (s % 4)), _mm512_set1_epi8(0x03));
  } else {  // kU3: low two bits as kU2, bit 2 from a 64-bit mask
    const uint8_t* chunk = blk + 96 * (s / 4);
    const __m512i lo = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(chunk), 2 * (s % 4)),
                                        _mm512_set1_epi8(0x03));
    uint64_t high;
    std::memcpy(&high, chunk + 64 + 8 * (s % 4), 8);
    return _mm512_mask_add_epi8(lo, (__mmask64)high, lo, _mm512_set1_epi8(4));
  }
}

// 16 scales or zero-points of one (tile, group) as fp32.
LOWBIT_INLINE __m512 load_group(const void* base, bool half, int64_t index) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + index)));
  return _mm512_loadu_ps((const float*)base + index);
}

LOWBIT_INLINE __m512 load_zero(const GroupParams& gp, int64_t index) {
  return gp.zero ? load_group(gp.zero, gp.half, index) : _mm512_set1_ps(gp.zero_const);
}

// Output rows of tile t for input rows m0..m0+MB-1, over the whole of K.
template <int KIND, int MB>
void tile_gemm(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int BB = block_size(KIND);
  const uint8_t* blk = a.codes + t * a.tile_bytes;
  const __m512i lut = KIND == kLut4 ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)a.lut))
                                    : _mm512_setzero_si512();
  const int64_t nblk = a.Kp / kBlock;
  const int8_t* xq[MB];
  const float* xs[MB];
  const float* xg[MB];
  __m512 facc[MB];
  for (int m = 0; m < MB; ++m) {
    xq[m] = a.x.q + (m0 + m) * a.Kp;
    xs[m] = a.x.scale + (m0 + m) * nblk;
    xg[m] = a.x.gsum + (m0 + m) * a.G;
    facc[m] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 gacc[MB];
    for (int m = 0; m < MB; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * a.bpg; b < (g + 1) * a.bpg; ++b, blk += BB) {
      if (m0 == 0)  // later row blocks find the tile in L1/L2
        for (int line = 0; line < BB; line += 64) _mm_prefetch((const char*)blk + kPrefetch + line, _MM_HINT_T0);
      __m512i acc[MB][2];  // two independent vpdpbusd chains per row (latency)
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        const __m512i w = sub_vector<KIND>(blk, s, lut);
        for (int m = 0; m < MB; ++m) acc[m][s & 1] = dot_broadcast(acc[m][s & 1], w, xq[m] + b * kBlock + 4 * s);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i dot = _mm512_add_epi32(acc[m][0], acc[m][1]);
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[m][b]), gacc[m]);
      }
    }
    const int64_t gi = (t * a.G + g) * kTileRows;
    const __m512 ws = load_group(a.gp.scale, a.gp.half, gi);
    const __m512 wz = _mm512_mul_ps(ws, load_zero(a.gp, gi));
    for (int m = 0; m < MB; ++m) {
      facc[m] = _mm512_fmadd_ps(gacc[m], ws, facc[m]);
      facc[m] = _mm512_fnmadd_ps(wz, _mm512_set1_ps(xg[m][g]), facc[m]);
    }
  }
  const int64_t n0 = t * kTileRows;
  const int64_t rows = std::min<int64_t>(kTileRows, a.N - n0);
  const __mmask16 mask = rows >= kTileRows ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
  const __m512 out_scale = _mm512_set1_ps(a.out_scale);
  for (int m = 0; m < MB; ++m)
    _mm512_mask_storeu_ps(a.y + (m0 + m) * a.N + n0, mask, _mm512_fmadd_ps(facc[m], out_scale, bias));
}

template <int KIND>
void gemm_kind(const GemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {  // the tile's codes stay in L1/L2 across row blocks
      switch (std::min<int64_t>(4, a.M - m0)) {
        case 1: tile_gemm<KIND, 1>(a, t, m0); break;
        case 2: tile_gemm<KIND, 2>(a, t, m0); break;
        case 3: tile_gemm<KIND, 3>(a, t, m0); break;
        default: tile_gemm<KIND, 4>(a, t, m0); break;
      }
    }
  }
}

// Row 4Q+i of a dequantized quarter: lanes 4i..4i+3 → out_rows + i·ld (first `cols` columns).
template <int I>
LOWBIT_INLINE void store_row4(float* row_ptr, __m512 v, int cols) {
  const __m128 part = _mm512_extractf32x4_ps(v, I);
  if (cols == 4) {
    _mm_storeu_ps(row_ptr, part);
  } else {
    alignas(16) float tmp[4];
    _mm_store_ps(tmp, part);
    for (int j = 0; j < cols; ++j) row_ptr[j] = tmp[j];
  }
}

LOWBIT_INLINE void store_rows(float* out, int64_t ld, __m512 v, int64_t rows, int cols) {
  if (rows >= 4) {
    store_row4<0>(out, v, cols);
    store_row4<1>(out + ld, v, cols);
    store_row4<2>(out + 2 * ld, v, cols);
    store_row4<3>(out + 3 * ld, v, cols);
    return;
  }
  if (rows > 0) store_row4<0>(out, v, cols);
  if (rows > 1) store_row4<1>(out + ld, v, cols);
  if (rows > 2) store_row4<2>(out + 2 * ld, v, cols);
}

template <int Q>
LOWBIT_INLINE __m512i quarter_codes(__m512i w) {  // bytes 16Q..16Q+15 widened to 32-bit lanes
  return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, Q));
}

// Rows are produced four at a time (one quarter of every sub-vector), so only four output rows are
// written concurrently: sixteen rows a multiple of 4 KiB apart would thrash an L1 set.
template <int KIND, int Q>
void dequant_quarter(const DequantArgs& a, int64_t t, float* out, int64_t rows) {
  constexpr int BB = block_size(KIND);
  constexpr int RAW = KIND == kLut4 ? kU4 : KIND;  // codebook kinds dequantize from the raw nibbles
  const __m512 table = KIND == kLut4 ? _mm512_loadu_ps(a.table) : _mm512_setzero_ps();
  // lane 4i+j ↦ row 4Q+i of the tile's 16 per-row scales/zeros
  const __m512i spread = _mm512_add_epi32(_mm512_set1_epi32(4 * Q),
                                          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
  const uint8_t* blk = a.codes + t * a.tile_bytes;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t gi = (t * a.G + g) * kTileRows;
    const __m512 ws = _mm512_permutexvar_ps(spread, load_group(a.gp.scale, a.gp.half, gi));
    const __m512 z = _mm512_permutexvar_ps(spread, load_zero(a.gp, gi));
    for (int64_t b = g * a.bpg; b < (g + 1) * a.bpg; ++b, blk += BB) {
      for (int s = 0; s < 8; ++s) {
        const int64_t k0 = b * kBlock + 4 * s;
        if (k0 >= a.K) break;
        const __m512i c = quarter_codes<Q>(sub_vector<RAW>(blk, s, _mm512_setzero_si512()));
        const __m512 v = KIND == kLut4 ? _mm512_mul_ps(_mm512_permutexvar_ps(c, table), ws)
                                       : _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), z), ws);
        store_rows(out + k0, a.K, v, rows, (int)std::min<int64_t>(4, a.K - k0));
      }
    }
  }
}

template <int KIND>
void dequant_kind(const DequantArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rows = std::min<int64_t>(kTileRows, a.N - t * kTileRows);
    float* out = a.out + (t * kTileRows - a.row0) * a.K;
    dequant_quarter<KIND, 0>(a, t, out, rows);
    if (rows > 4) dequant_quarter<KIND, 1>(a, t, out + 4 * a.K, rows - 4);
    if (rows > 8) dequant_quarter<KIND, 2>(a, t, out + 8 * a.K, rows - 8);
    if (rows > 12) dequant_quarter<KIND, 3>(a, t, out + 12 * a.K, rows - 12);
  }
}

}  // namespace

void quantize_x(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale, int32_t* sum) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b * kBlock < Kp; ++b) {
    const int64_t k0 = b * kBlock;
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kBlock, K - k0));
    const __mmask16 m0 = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    const __mmask16 m1 = valid >= 32 ? (__mmask16)0xFFFF : valid > 16 ? (__mmask16)((1u << (valid - 16)) - 1) : 0;
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + k0), v1 = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128((__m128i*)(q + k0), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + k0 + 16), _mm512_cvtsepi32_epi8(q1));
    scale[b] = amax / 127.f;
    sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

void gemm(const GemmArgs& a, int64_t t0, int64_t t1) {
  switch (a.kind) {
    case kU8: gemm_kind<kU8>(a, t0, t1); break;
    case kU4: gemm_kind<kU4>(a, t0, t1); break;
    case kU2: gemm_kind<kU2>(a, t0, t1); break;
    case kU3: gemm_kind<kU3>(a, t0, t1); break;
    case kLut4: gemm_kind<kLut4>(a, t0, t1); break;
  }
}

void dequant(const DequantArgs& a, int64_t t0, int64_t t1) {
  switch (a.kind) {
    case kU8: dequant_kind<kU8>(a, t0, t1); break;
    case kU4: dequant_kind<kU4>(a, t0, t1); break;
    case kU2: dequant_kind<kU2>(a, t0, t1); break;
    case kU3: dequant_kind<kU3>(a, t0, t1); break;
    case kLut4: dequant_kind<kLut4>(a, t0, t1); break;
  }
}

}  // namespace avx512
}  // namespace lowbit_cpu

#pragma GCC pop_options

#endif  // x86
