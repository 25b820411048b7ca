// AVX2 + AVX-VNNI (e.g. Alder Lake, Zen 5 without AVX-512 use): vpdpbusd on 256-bit vectors.
// Only called after a runtime CPU check; the kernels live in gemm_avx2_impl.h.
#if defined(__x86_64__) || defined(__i386__)  // other architectures build only the scalar kernels
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

#define LOWBIT_VNNI 1

namespace lowbit_cpu {
namespace avx2_vnni {
#include "gemm_avx2_impl.h"
}  // namespace avx2_vnni
}  // namespace lowbit_cpu

#undef LOWBIT_VNNI
#pragma GCC pop_options

#endif  // x86
