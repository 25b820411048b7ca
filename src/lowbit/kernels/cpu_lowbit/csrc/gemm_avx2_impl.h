// AVX2 kernels, included by gemm_avx2.cpp (maddubs dot products) and gemm_avx2_vnni.cpp
// (AVX-VNNI vpdpbusd) with LOWBIT_VNNI set to 0 or 1 and the matching target pragma active.
// A 16-row tile is handled as two halves of 8 rows (bytes 32h..32h+31 of each 64-byte chunk).
#ifndef LOWBIT_VNNI
#error "define LOWBIT_VNNI before including gemm_avx2_impl.h"
#endif

#define LOWBIT_INLINE inline __attribute__((always_inline))

namespace {

constexpr int block_size(int kind) {
  return kind == kU8 ? 512 : kind == kU2 ? 128 : kind == kU3 ? 192 : 256;
}

LOWBIT_INLINE __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 32 mask bits → 32 bytes (0x04 where set): bit i of `bits` ↦ byte i.
LOWBIT_INLINE __m256i expand_bits_to_4(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(on, _mm256_set1_epi8(4));
}

// Sub-vector s, half h (8 rows × 4 columns) as unsigned bytes (kLut4: looked up).
template <int KIND>
LOWBIT_INLINE __m256i sub_vector(const uint8_t* blk, int s, int h, __m256i lut) {
  if constexpr (KIND == kU8) {
    return _mm256_loadu_si256((const __m256i*)(blk + 64 * s + 32 * h));
  } else if constexpr (KIND == kU4 || KIND == kLut4) {
    __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 64 * (s / 2) + 32 * h));
    if (s & 1) v = _mm256_srli_epi16(v, 4);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    if constexpr (KIND == kLut4) v = _mm256_shuffle_epi8(lut, v);
    return v;
  } else if constexpr (KIND == kU2) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 64 * (s / 4) + 32 * h));
    return _mm256_and_si256(_mm256_srli_epi16(v, 2 * (s % 4)), _mm256_set1_epi8(0x03));
  } else {
    const uint8_t* chunk = blk + 96 * (s / 4);
    const __m256i lo = _mm256_and_si256(
        _mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)(chunk + 32 * h)), 2 * (s % 4)), _mm256_set1_epi8(0x03));
    uint32_t high;
    std::memcpy(&high, chunk + 64 + 8 * (s % 4) + 4 * h, 4);
    return _mm256_add_epi8(lo, expand_bits_to_4(high));
  }
}

// Codes up to 255 (kU8, kLut4) overflow maddubs' int16 pairs; they are multiplied as (u − 128)
// and corrected with 128·Σq per block.
template <int KIND>
constexpr bool kWide = KIND == kU8 || KIND == kLut4;

// acc += Σ_j w[lane, j]·x[j] for 4-byte lanes. `pairs` collects int16 maddubs sums of small codes
// (8 sub-vectors × 2·15·127 fits in int16) and is folded into acc once per block.
template <int KIND>
LOWBIT_INLINE void dot4(__m256i& acc, __m256i& pairs, __m256i w, __m256i x) {
#if LOWBIT_VNNI
  (void)pairs;
  acc = _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  if constexpr (kWide<KIND>) {
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));  // u − 128 as int8
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    (void)pairs;
  } else {
    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w, x));
  }
#endif
}

template <int KIND>
LOWBIT_INLINE __m256i finish_block(__m256i acc, __m256i pairs, int32_t qsum) {
#if LOWBIT_VNNI
  (void)pairs;
  (void)qsum;
  return acc;
#else
  if constexpr (kWide<KIND>) return _mm256_add_epi32(acc, _mm256_set1_epi32(128 * qsum));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

LOWBIT_INLINE __m256 load_group8(const void* base, bool half, int64_t index) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + index)));
  return _mm256_loadu_ps((const float*)base + index);
}

LOWBIT_INLINE __m256 load_zero8(const GroupParams& gp, int64_t index) {
  return gp.zero ? load_group8(gp.zero, gp.half, index) : _mm256_set1_ps(gp.zero_const);
}

template <int KIND, int MB>
void tile_gemm(const GemmArgs& a, int64_t t, int64_t m0) {
  constexpr int BB = block_size(KIND);
  const uint8_t* blk = a.codes + t * a.tile_bytes;
  const __m256i lut = KIND == kLut4 ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)a.lut))
                                    : _mm256_setzero_si256();
  const int64_t nblk = a.Kp / kBlock;
  __m256 facc[MB][2];
  for (int m = 0; m < MB; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 gacc[MB][2];
    for (int m = 0; m < MB; ++m) gacc[m][0] = gacc[m][1] = _mm256_setzero_ps();
    for (int64_t b = g * a.bpg; b < (g + 1) * a.bpg; ++b, blk += BB) {
      for (int line = 0; line < BB; line += 64) _mm_prefetch((const char*)blk + 4096 + line, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        __m256i acc[MB], pairs[MB];
        for (int m = 0; m < MB; ++m) acc[m] = pairs[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
          const __m256i w = sub_vector<KIND>(blk, s, h, lut);
          for (int m = 0; m < MB; ++m)
            dot4<KIND>(acc[m], pairs[m], w, broadcast4(a.x.q + (m0 + m) * a.Kp + b * kBlock + 4 * s));
        }
        for (int m = 0; m < MB; ++m) {
          const int64_t xb = (m0 + m) * nblk + b;
          const __m256i dot = finish_block<KIND>(acc[m], pairs[m], a.x.sum[xb]);
          gacc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.x.scale[xb]), gacc[m][h]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t gi = (t * a.G + g) * kTileRows + 8 * h;
      const __m256 ws = load_group8(a.gp.scale, a.gp.half, gi);
      const __m256 wz = _mm256_mul_ps(ws, load_zero8(a.gp, gi));
      for (int m = 0; m < MB; ++m) {
        facc[m][h] = _mm256_fmadd_ps(gacc[m][h], ws, facc[m][h]);
        facc[m][h] = _mm256_fnmadd_ps(wz, _mm256_set1_ps(a.x.gsum[(m0 + m) * a.G + g]), facc[m][h]);
      }
    }
  }
  const int64_t n0 = t * kTileRows;
  for (int m = 0; m < MB; ++m) {
    alignas(32) float out[kTileRows];
    _mm256_store_ps(out, facc[m][0]);
    _mm256_store_ps(out + 8, facc[m][1]);
    for (int r = 0; r < kTileRows && n0 + r < a.N; ++r)
      a.y[(m0 + m) * a.N + n0 + r] = out[r] * a.out_scale + (a.bias ? a.bias[n0 + r] : 0.f);
  }
}

template <int KIND>
void gemm_kind(const GemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m0 = 0; m0 < a.M; m0 += 2) {
      if (a.M - m0 >= 2) tile_gemm<KIND, 2>(a, t, m0);
      else tile_gemm<KIND, 1>(a, t, m0);
    }
}

}  // namespace

void quantize_x(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale, int32_t* sum) {
  quantize_row(x, K, Kp, q, scale, sum);
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

void dequant(const DequantArgs& a, int64_t t0, int64_t t1) { scalar::dequant(a, t0, t1); }

#undef LOWBIT_INLINE
