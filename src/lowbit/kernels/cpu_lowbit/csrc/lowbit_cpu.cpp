// Torch custom ops for the low-bit CPU kernels (schemas and shapes: ops.py; layout: kernels.h).
//
//   lowbit_cpu::qlinear    y = x·Wᵀ + b. M ≤ int_max_m input rows: int8-quantized activations ×
//                          low-bit codes with integer dot products; more rows: W is dequantized
//                          tile by tile to fp32 and multiplied with ATen's matmul (exact path).
//   lowbit_cpu::dequantize W as fp32 [N, K].
//
// W is one uint8 tensor (kernels.h: "Packed weight"): a 64-byte header of section offsets, then
// codes, scales, zero-points and codebook tables. One tensor per layer instead of five matters to
// a compiled decode step: torch.compile guards and converts every tensor input on every call.
//   lowbit_cpu::isa        the instruction set the kernels run with on this machine.
//
// aoti_torch_cpu_qlinear is the C shim of qlinear: code that Inductor's C++ wrapper generates calls
// it directly (ops.py: C_SHIMS) instead of going through the boxed dispatcher, which costs several
// µs per call — a large share of a small model's decode step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace lowbit_cpu {
namespace {

enum Isa : int64_t { kAuto = 0, kAvx512 = 1, kAvx2Vnni = 2, kAvx2 = 3, kScalar = 4 };

#if defined(__x86_64__) || defined(__i386__)
#define LOWBIT_X86 1
#else
#define LOWBIT_X86 0
#endif

bool isa_supported(int64_t isa) {
#if LOWBIT_X86
  __builtin_cpu_init();  // these checks include the OS's support for the register state
  switch (isa) {
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx2Vnni:
      return isa_supported(kAvx2) && __builtin_cpu_supports("avxvnni");
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return isa == kScalar;
  }
#else
  return isa == kScalar;
#endif
}

int64_t best_isa() {
  static const int64_t isa = [] {
    for (int64_t candidate : {kAvx512, kAvx2Vnni, kAvx2})
      if (isa_supported(candidate)) return candidate;
    return (int64_t)kScalar;
  }();
  return isa;
}

// The requested ISA when this CPU has it, else the best one (kAuto: the best one).
int64_t resolve_isa(int64_t requested) {
  return requested != kAuto && isa_supported(requested) ? requested : best_isa();
}

struct Layout {
  int kind;
  int64_t N, K, Kp, G, bpg, T, tile_bytes;
  const uint8_t* codes;
  GroupParams gp;
  const uint8_t* lut;   // kLut4: [16]
  const float* table;   // kLut4: [16]
};

// Checks the packed weight against (kind, n, k, group_size) and locates its sections.
Layout check_layout(const at::Tensor& packed, int64_t kind, int64_t n, int64_t k, int64_t group_size) {
  TORCH_CHECK(kind >= kU8 && kind <= kLut4, "lowbit_cpu: unknown weight kind ", kind);
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0, "lowbit_cpu: group_size must be a multiple of 32");
  Layout l{(int)kind, n, k, 0, 0, group_size / kBlock, (n + kTileRows - 1) / kTileRows, 0, nullptr, {}, nullptr,
           nullptr};
  l.Kp = (k + kBlock - 1) / kBlock * kBlock;
  TORCH_CHECK(l.Kp % group_size == 0, "lowbit_cpu: group_size ", group_size, " does not divide padded K ", l.Kp);
  l.G = l.Kp / group_size;
  l.tile_bytes = (l.Kp / kBlock) * block_bytes(l.kind);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.dim() == 1 && packed.numel() >= (int64_t)sizeof(PackedHeader),
              "lowbit_cpu: the packed weight must be a contiguous 1-D uint8 tensor with a header");
  const uint8_t* base = packed.data_ptr<uint8_t>();
  PackedHeader h;
  std::memcpy(&h, base, sizeof(h));
  TORCH_CHECK(h.magic == kPackedMagic, "lowbit_cpu: not a packed weight (bad header)");
  const bool half = h.flags & kPackedHalf, zero_const = h.flags & kPackedZeroConst;
  const int64_t elt = half ? 2 : 4, params = l.T * l.G * kTileRows;
  const bool lut = kind == kLut4;
  const int64_t sizes[5] = {l.T * l.tile_bytes, params * elt, (zero_const ? 1 : params) * elt, lut ? 16 : 0,
                            lut ? 64 : 0};
  const int64_t starts[5] = {h.codes, h.scale, h.zero, h.lut, h.table};
  for (int i = 0; i < 5; ++i)  // compared without adding header values, so a garbage offset cannot overflow
    TORCH_CHECK(starts[i] >= (int64_t)sizeof(PackedHeader) && starts[i] % 64 == 0 && starts[i] <= packed.numel() &&
                    sizes[i] <= packed.numel() - starts[i],
                "lowbit_cpu: packed weight section ", i, " does not fit a ", n, "x", k, " kind-", kind,
                " weight with group size ", group_size, " (", packed.numel(), " bytes)");
  l.codes = base + h.codes;
  const void* zp = base + h.zero;
  const float zc = !zero_const ? 0.f
                   : half      ? static_cast<float>(*reinterpret_cast<const at::Half*>(zp))
                               : *reinterpret_cast<const float*>(zp);
  l.gp = GroupParams{base + h.scale, zero_const ? nullptr : zp, half, zc};
  l.lut = lut ? base + h.lut : nullptr;
  l.table = lut ? reinterpret_cast<const float*>(base + h.table) : nullptr;
  return l;
}

// Tiles per parallel task: at least ~256 KiB of weights, so small layers stay on one thread.
int64_t tile_grain(const Layout& l) {
  return std::max<int64_t>(1, (int64_t)(256 * 1024) / std::max<int64_t>(1, l.tile_bytes));
}

// Kernels of one ISA (an ISA that is not compiled for this architecture falls back to scalar).
void gemm_isa(int64_t isa, const GemmArgs& args, int64_t t0, int64_t t1) {
  switch (isa) {
#if LOWBIT_X86
    case kAvx512: return avx512::gemm(args, t0, t1);
    case kAvx2Vnni: return avx2_vnni::gemm(args, t0, t1);
    case kAvx2: return avx2::gemm(args, t0, t1);
#endif
    default: return scalar::gemm(args, t0, t1);
  }
}

void dequant_isa(int64_t isa, const DequantArgs& args, int64_t t0, int64_t t1) {
  switch (isa) {
#if LOWBIT_X86
    case kAvx512: return avx512::dequant(args, t0, t1);
    case kAvx2Vnni: return avx2_vnni::dequant(args, t0, t1);
    case kAvx2: return avx2::dequant(args, t0, t1);
#endif
    default: return scalar::dequant(args, t0, t1);
  }
}

void quantize_x_isa(int64_t isa, const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale, int32_t* sum) {
#if LOWBIT_X86
  if (isa == kAvx512) return avx512::quantize_x(x, K, Kp, q, scale, sum);
#endif
  scalar::quantize_x(x, K, Kp, q, scale, sum);
}

at::Tensor dequantize(const at::Tensor& packed, int64_t kind, int64_t n, int64_t k, int64_t group_size,
                      int64_t isa) {
  const Layout l = check_layout(packed, kind, n, k, group_size);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kFloat));
  const DequantArgs args{l.kind, n, k, l.Kp, l.G, l.bpg, l.codes, l.tile_bytes, l.gp, l.table,
                         out.data_ptr<float>(), 0};
  const int64_t use = resolve_isa(isa);
  at::parallel_for(0, l.T, tile_grain(l), [&](int64_t b, int64_t e) { dequant_isa(use, args, b, e); });
  return out;
}

// Exact path: the tiles are split into chunks of ~8 MiB of fp32 weights (≥ 256 rows, so each matmul
// is efficient; fewer when that would leave a thread idle); each thread dequantizes a chunk and
// multiplies every input row with it (a serial matmul inside the parallel region), so the fp32
// weight stays in the cache instead of going to memory. The matmul runs in x's dtype (fp32, or
// bf16/fp16 like the reference).
at::Tensor linear_dequant(const at::Tensor& x2, const Layout& l, int64_t isa) {
  const auto dtype = x2.scalar_type() == at::kDouble ? at::kFloat : x2.scalar_type();
  const at::Tensor xc = x2.to(dtype).contiguous();
  at::Tensor y = at::empty({x2.size(0), l.N}, xc.options());
  const int64_t per_thread = (l.T + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t chunk_tiles =
      std::max<int64_t>(1, std::min(per_thread, std::max<int64_t>(16, (int64_t)(8 << 20) / (kTileRows * l.K * 4))));
  const int64_t chunks = (l.T + chunk_tiles - 1) / chunk_tiles;
  const at::ThreadLocalState tls;  // ATen ops on worker threads: same inference/grad mode as the caller
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor buf = at::empty({chunk_tiles * kTileRows, l.K}, xc.options().dtype(at::kFloat));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk_tiles, t1 = std::min(l.T, t0 + chunk_tiles);
      const int64_t r0 = t0 * kTileRows, rows = std::min(l.N, t1 * kTileRows) - r0;
      const DequantArgs args{l.kind, l.N, l.K, l.Kp, l.G, l.bpg, l.codes, l.tile_bytes, l.gp, l.table,
                             buf.data_ptr<float>(), r0};
      dequant_isa(isa, args, t0, t1);
      const at::Tensor w = buf.narrow(0, 0, rows).to(dtype);
      y.narrow(1, r0, rows).copy_(at::matmul(xc, w.t()));
    }
  });
  return y;
}

// Workspace for the quantized activations, kept per calling thread: a decode step makes dozens of
// small calls, and an allocation per call is a measurable share of each (M ≤ int_max_m rows, so it
// stays small). Only the calling thread writes it; the parallel workers read it.
uint8_t* workspace(int64_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if ((int64_t)buf.size() < bytes + 64) buf.resize(bytes + 64);
  const auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64);  // cache-line aligned, like an ATen allocation
}

// The int8-activation path writes into y ([M, N] float32, contiguous).
void linear_int8(const float* xp, int64_t M, const Layout& l, double out_scale, const c10::optional<at::Tensor>& bias,
                 int64_t isa, float* yp) {
  const int64_t nblk = l.Kp / kBlock;
  // one workspace for the quantized x: q int8 [M, Kp] | scale f32 [M, nblk] | sum i32 [M, nblk] | gsum f32 [M, G]
  auto align = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t q_bytes = align(M * l.Kp), s_bytes = align(M * nblk * 4), g_bytes = align(M * l.G * 4);
  uint8_t* base = workspace(q_bytes + 2 * s_bytes + g_bytes);
  int8_t* qp = reinterpret_cast<int8_t*>(base);
  float* sp = reinterpret_cast<float*>(base + q_bytes);
  int32_t* up = reinterpret_cast<int32_t*>(base + q_bytes + s_bytes);
  float* gp = reinterpret_cast<float*>(base + q_bytes + 2 * s_bytes);
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, l.K)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      quantize_x_isa(isa, xp + m * l.K, l.K, l.Kp, qp + m * l.Kp, sp + m * nblk, up + m * nblk);
      for (int64_t g = 0; g < l.G; ++g) {  // the dequantized activations summed per group
        float s = 0.f;
        for (int64_t b2 = g * l.bpg; b2 < (g + 1) * l.bpg; ++b2) s += sp[m * nblk + b2] * (float)up[m * nblk + b2];
        gp[m * l.G + g] = s;
      }
    }
  });
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == l.N, "lowbit_cpu: bias must have ", l.N, " elements");
  }
  const GemmArgs args{l.kind, M, l.N, l.Kp, l.G, l.bpg, l.codes, l.tile_bytes, l.gp, l.lut,
                      (float)out_scale, QuantizedX{qp, sp, up, gp},
                      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, yp};
  at::parallel_for(0, l.T, std::max<int64_t>(1, tile_grain(l) / std::max<int64_t>(1, M)),
                   [&](int64_t b, int64_t e) { gemm_isa(isa, args, b, e); });
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t kind,
                   int64_t n, int64_t k, int64_t group_size, double out_scale, int64_t int_max_m, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu(), "lowbit_cpu: x must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lowbit_cpu: x must be floating point");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "lowbit_cpu: x must have ", k, " features in its last dimension");
  const Layout l = check_layout(packed, kind, n, k, group_size);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t M = k == 0 ? 0 : x.numel() / k;
  if (M == 0) return at::empty(out_shape, x.options());
  const int64_t use = resolve_isa(isa);
  if (M <= int_max_m) {  // decode: few ATen calls, since per-call overhead is a large share here
    const bool direct = x.scalar_type() == at::kFloat && x.is_contiguous();
    const at::Tensor xf = direct ? x : x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));
    linear_int8(xf.data_ptr<float>(), M, l, out_scale, bias, use, y.data_ptr<float>());
    return direct ? y : y.to(x.scalar_type());
  }
  at::Tensor y = linear_dequant(x.reshape({-1, k}), l, use);
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace lowbit_cpu

extern "C" __attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_qlinear(
    AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle* bias, int64_t kind, int64_t out_features,
    int64_t in_features, int64_t group_size, double out_scale, int64_t int_max_m, int64_t isa, AtenTensorHandle* ret0) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    const c10::optional<at::Tensor> bias_t =
        bias != nullptr ? c10::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*bias)) : c10::nullopt;
    at::Tensor y = lowbit_cpu::qlinear(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed),
                                       bias_t, kind, out_features, in_features, group_size, out_scale, int_max_m, isa);
    *ret0 = torch::aot_inductor::new_tensor_handle(std::move(y));
  });
}

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("qlinear(Tensor x, Tensor packed, Tensor? bias, int kind, int out_features, int in_features, "
        "int group_size, float out_scale, int int_max_m, int isa) -> Tensor");
  m.def("dequantize(Tensor packed, int kind, int out_features, int in_features, int group_size, int isa) "
        "-> Tensor");
  m.def("isa() -> int", &lowbit_cpu::best_isa);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("qlinear", &lowbit_cpu::qlinear);
  m.impl("dequantize", &lowbit_cpu::dequantize);
}
