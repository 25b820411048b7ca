// AVX2 + FMA: int8 dot products with vpmaddubsw (no VNNI).
// Only called after a runtime CPU check; the kernels live in gemm_avx2_impl.h.
#if defined(__x86_64__) || defined(__i386__)  // other architectures build only the scalar kernels
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define LOWBIT_VNNI 0

namespace lowbit_cpu {
namespace avx2 {
#include "gemm_avx2_impl.h"
}  // namespace avx2
}  // namespace lowbit_cpu

#undef LOWBIT_VNNI
#pragma GCC pop_options

#endif  // x86
