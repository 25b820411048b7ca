"""Weight-only linear kernels vs peers on Llama-2-7B linear shapes, with the memory-bandwidth limit.

    python bench/kernels.py [--device cpu|cuda] [--shapes 4096x4096 11008x4096 4096x11008]
                            [--m 1 16 64 256] [--repeat 20] [--threads T] [--json]

Shapes are N×K (out×in). For every shape and batch size M it times (median of repeats after
warm-up, in ms):

* lowbit — the kernel ``dispatch.select_weight_kernel`` picks on the device — for int4-g128 asym/sym,
  int8 per-channel, nf4 (b64), int3-g128 and int2-g64 (CPU: int8 activations up to 8 rows, the exact
  path above), plus on CPU the int8-activation path at every M and the exact path (``cpu_exact``);
* peers: fp32 and bf16 (CUDA: fp16) ``F.linear``; CPU: ``torch._weight_int4pack_mm_for_cpu`` (int4
  g128), ``torch._weight_int8pack_mm``, torch.ao dynamic int8 (fbgemm); CUDA: ``torch._weight_int4pack_mm``
  (tinygemm); bitsandbytes NF4 and LLM.int8 where importable. A peer that cannot run prints
  ``n/a (reason)``.

The bandwidth limit is measured in the same run (best of several ``torch.sum`` passes over a buffer
far larger than the last-level cache); "% limit" = time to read that method's weight bytes at that
bandwidth ÷ measured time. Every method rotates over enough copies of its weight that each call
reads it from memory, not from the cache (as in whole-model decode).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from pathlib import Path

# this file is named kernels.py: keep its directory off the import path, or it would shadow the
# `kernels` package that bitsandbytes tries to import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.kernels import dispatch  # noqa: E402
from lowbit.tensor import QuantizedWeight  # noqa: E402

DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008")
ROTATE_BYTES = 320 << 20  # ≫ a 32 MiB L3 / 50 MiB GPU L2
OURS = [("int4-g128-asym", QuantSpec.int_(4, 128, False)), ("int4-g128-sym", QuantSpec.int_(4, 128, True)),
        ("int8-ch-sym", QuantSpec.int_(8, None, True)), ("nf4-b64", QuantSpec.nf4(64)),
        ("int3-g128-asym", QuantSpec.int_(3, 128, False)), ("int2-g64-asym", QuantSpec.int_(2, 64, False))]

Run = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class Built:
    """A method ready to time: ``run(state, x)``; ``state`` is deep-copied for cache rotation."""

    run: Run
    state: Any
    nbytes: int  # weight bytes one call reads
    x_dtype: torch.dtype
    note: str = ""


@dataclass
class Method:
    name: str
    build: Callable[[torch.Tensor, torch.device], Built]  # fp32 weight [N, K] on the device → Built


# ---- timing ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeat: int, budget_s: float = 3.0) -> float:
    """Median wall time of ``fn`` in ms: one warm-up call, then ``repeat`` timed calls (fewer, but at
    least 3, when that would take longer than ``budget_s``; one when a single call does)."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    count = 1 if first > budget_s else max(3, min(repeat, int(budget_s / max(first, 1e-6))))
    times: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bandwidth_gbps(device: torch.device, mib: int = 1024, passes: int = 10) -> tuple[float, str]:
    """Read bandwidth (GB/s): the fastest of several full reductions of a ``mib`` MiB buffer (best of
    ``passes`` each; the integer and float64 views need fewer instructions per byte than fp32 sums)."""
    buf = torch.ones(mib << 18, dtype=torch.float32, device=device)
    probes = {"sum fp32": lambda: buf.sum(), "sum int64 view": lambda: buf.view(torch.int64).sum(),
              "sum fp64 view": lambda: buf.view(torch.float64).sum()}
    best_rate, best_name = 0.0, ""
    for name, probe in probes.items():
        probe()
        sync(device)
        for _ in range(passes):
            start = time.perf_counter()
            probe()
            sync(device)
            rate = buf.numel() * 4 / (time.perf_counter() - start) / 1e9
            if rate > best_rate:
                best_rate, best_name = rate, name
    return best_rate, best_name


# ---- methods ---------------------------------------------------------------------------------
def _float_linear(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.device], Built]:
    def build(w: torch.Tensor, device: torch.device) -> Built:
        wd = w.to(dtype)
        return Built(lambda state, x: F.linear(x, state), wd, wd.numel() * wd.element_size(), dtype)
    return build


def _ours(spec: QuantSpec, family: str | None = None, int8_all: bool = False
          ) -> Callable[[torch.Tensor, torch.device], Built]:
    """lowbit's kernel for ``spec``: the one dispatch picks, or the named ``family``; ``int8_all``:
    the CPU kernel with int8 activations at every batch size (not only decode-sized ones)."""
    def build(w: torch.Tensor, device: torch.device) -> Built:
        qw = QuantizedWeight.from_float(w, spec)
        if family is None:
            kernel = dispatch.select_weight_kernel(qw, device)
        else:
            kernel = next((k for k in dispatch.weight_kernels(device.type) if k.name == family), None)
            if kernel is None or not kernel.supports(qw):
                raise RuntimeError(f"kernel family {family!r} unavailable for {spec.describe()}")
        if int8_all:
            from lowbit.kernels.cpu_lowbit import prepare

            state = prepare(qw, int_max_m=1 << 30)
        else:
            state = kernel.prepare(qw)
        nbytes = getattr(state, "nbytes", None) or qw.nbytes
        x_dtype = torch.float16 if device.type == "cuda" else torch.float32
        return Built(lambda s, x: kernel.apply(x, s, None), state, int(nbytes), x_dtype, note=kernel.name)
    return build


def _tinygemm_qparams(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes (int32 [N, K]) and tinygemm's scales_and_zeros [K/g, N, 2]:
    W = (q − 8)·scale + zero."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale.reshape(n, -1).t(), zero.reshape(n, -1).t()], dim=-1).contiguous()
    return q, sz


def _torch_int4_cpu(w: torch.Tensor, device: torch.device) -> Built:
    q, sz = _tinygemm_qparams(w, 128)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    state = (packed, sz)
    return Built(lambda s, x: torch._weight_int4pack_mm_for_cpu(x, s[0], 128, s[1]), state,
                 packed.numel() * packed.element_size() + sz.numel() * sz.element_size(), torch.float32)


def _torch_int4_cuda(w: torch.Tensor, device: torch.device) -> Built:
    q, sz = _tinygemm_qparams(w, 128)
    q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)  # uint8 [N, K/2], as torch ≥ 2.5 expects
    packed = torch._convert_weight_to_int4pack(q8, 8)
    sz = sz.to(device=device, dtype=torch.bfloat16)
    return Built(lambda s, x: torch._weight_int4pack_mm(x, s[0], 128, s[1]), (packed, sz),
                 packed.numel() * packed.element_size() + sz.numel() * sz.element_size(), torch.bfloat16)


def _torch_int8pack(w: torch.Tensor, device: torch.device) -> Built:
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Built(lambda s, x: torch._weight_int8pack_mm(x, s[0], s[1]), (q, scale), q.numel() + 4 * scale.numel(),
                 torch.float32)


def _torch_ao_dynamic(w: torch.Tensor, device: torch.device) -> Built:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        module = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    return Built(lambda s, x: s(x), module, w.numel(), torch.float32, note="fbgemm")


def _bnb_nf4(w: torch.Tensor, device: torch.device) -> Built:
    import bitsandbytes as bnb

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.to(dtype).cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.to(device)
    return Built(lambda s, x: s(x), layer, w.numel() // 2 + w.numel() // 64 * 4, dtype)


def _bnb_int8(w: torch.Tensor, device: torch.device) -> Built:
    import bitsandbytes as bnb

    if device.type != "cuda":
        raise RuntimeError("LLM.int8 is benchmarked on CUDA only")
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.half().cpu(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    return Built(lambda s, x: s(x), layer, w.numel() + 4 * w.shape[0], torch.float16)


def methods_for(device: torch.device) -> list[Method]:
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    out = [Method("torch fp32 F.linear", _float_linear(torch.float32)),
           Method(f"torch {str(half).split('.')[-1]} F.linear", _float_linear(half))]
    out += [Method(f"lowbit {label}", _ours(spec)) for label, spec in OURS]
    if device.type == "cpu":
        out += [Method("lowbit int4-g128-asym, int8 act. at all M", _ours(OURS[0][1], family="cpu", int8_all=True)),
                Method("lowbit int8-ch-sym, int8 act. at all M", _ours(OURS[2][1], family="cpu", int8_all=True)),
                Method("lowbit cpu_exact int4-g128-asym", _ours(OURS[0][1], family="cpu_exact")),
                Method("torch _weight_int4pack_mm_for_cpu g128", _torch_int4_cpu),
                Method("torch _weight_int8pack_mm", _torch_int8pack),
                Method("torch.ao dynamic int8", _torch_ao_dynamic),
                Method("bitsandbytes nf4", _bnb_nf4)]
    else:
        out += [Method("torch _weight_int4pack_mm g128 (tinygemm)", _torch_int4_cuda),
                Method("torch _weight_int8pack_mm", _torch_int8pack),
                Method("bitsandbytes nf4", _bnb_nf4),
                Method("bitsandbytes LLM.int8", _bnb_int8)]
    return out


# ---- driver ----------------------------------------------------------------------------------
def bench_shape(n: int, k: int, ms: list[int], device: torch.device, bw: float, repeat: int) -> list[dict]:
    """Rows {shape, m, method, ms, bytes, note, error} for one weight shape."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device)
    rows: list[dict] = []
    for method in methods_for(device):
        try:
            built = method.build(w, device)
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            rows += [dict(shape=f"{n}x{k}", m=m, method=method.name, ms=None, bytes=None, note="",
                          error=f"{type(err).__name__}: {err}".splitlines()[0][:90]) for m in ms]
            continue
        copies = rotation(built)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=built.x_dtype)
            turn = iter(range(1 << 62))
            try:
                with torch.inference_mode():
                    t = median_ms(lambda: built.run(copies[next(turn) % len(copies)], x), device, repeat)
                rows.append(dict(shape=f"{n}x{k}", m=m, method=method.name, ms=t, bytes=built.nbytes,
                                 note=built.note, error=None))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(shape=f"{n}x{k}", m=m, method=method.name, ms=None, bytes=built.nbytes,
                                 note=built.note, error=f"{type(err).__name__}: {err}".splitlines()[0][:90]))
        del copies, built
    for row in rows:
        fp32 = next((r["ms"] for r in rows if r["m"] == row["m"] and r["method"] == "torch fp32 F.linear"), None)
        row["limit_ms"] = None if row["bytes"] is None else 1e3 * row["bytes"] / (bw * 1e9)
        row["vs_fp32"] = None if row["ms"] is None or fp32 is None else fp32 / row["ms"]
        row["pct_limit"] = None if row["ms"] is None or row["limit_ms"] is None else 100 * row["limit_ms"] / row["ms"]
    return rows


def rotation(built: Built) -> list[Any]:
    """``built.state`` and enough deep copies that all of them together exceed the caches."""
    copies = [built.state]
    try:
        for _ in range(max(0, math.ceil(ROTATE_BYTES / max(built.nbytes, 1)) - 1)):
            copies.append(copy.deepcopy(built.state))
    except Exception as err:  # noqa: BLE001 - e.g. a module that cannot be deep-copied: time it cache-warm
        built.note = (built.note + " no-rotation").strip()
        print(f"  (could not copy the weight for cache rotation: {err})", file=sys.stderr)
    return copies


def print_table(rows: list[dict]) -> None:
    header = f"{'method':42s} {'kernel':10s} {'ms':>9s} {'× fp32':>8s} {'MB':>8s} {'limit ms':>9s} {'% limit':>8s}"
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for m in dict.fromkeys(r["m"] for r in rows if r["shape"] == shape):
            print(f"\n== N×K = {shape}, M = {m}\n{header}")
            for r in (r for r in rows if r["shape"] == shape and r["m"] == m):
                if r["ms"] is None:
                    print(f"{r['method']:42s} n/a ({r['error']})")
                    continue
                print(f"{r['method']:42s} {r['note']:10s} {r['ms']:9.3f} {r['vs_fp32']:7.2f}× {r['bytes'] / 1e6:8.2f} "
                      f"{r['limit_ms']:9.3f} {r['pct_limit']:7.1f}%")


def summary(rows: list[dict]) -> list[str]:
    """One line per M: lowbit int4-g128-asym vs fp32 and vs the limit (geometric means over shapes)."""
    lines = []
    for m in dict.fromkeys(r["m"] for r in rows):
        for name in ("lowbit int4-g128-asym", "lowbit int8-ch-sym", "lowbit int4-g128-asym, int8 act. at all M",
                     "lowbit int8-ch-sym, int8 act. at all M"):
            sel = [r for r in rows if r["m"] == m and r["method"] == name and r["ms"] is not None]
            if not sel:
                continue
            speed = math.exp(statistics.mean(math.log(r["vs_fp32"]) for r in sel))
            pct = math.exp(statistics.mean(math.log(r["pct_limit"]) for r in sel))
            peers = [r for r in rows if r["m"] == m and r["ms"] is not None and r["method"].startswith(("torch", "bitsandbytes"))
                     and "F.linear" not in r["method"]]
            best = {}
            for r in peers:
                best.setdefault(r["shape"], r)
                if r["ms"] < best[r["shape"]]["ms"]:
                    best[r["shape"]] = r
            vs_peer = [next(p for p in best.values() if p["shape"] == r["shape"])["ms"] / r["ms"]
                       for r in sel if r["shape"] in best]
            peer_txt = (f", {math.exp(statistics.mean(math.log(v) for v in vs_peer)):.2f}× the fastest quantized peer"
                        if vs_peer else "")
            lines.append(f"M={m:<4d} {name}: {speed:.2f}× fp32 F.linear, {pct:.0f}% of the bandwidth limit{peer_txt} "
                         f"(geometric mean over {len(sel)} shapes)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="N×K (out×in), e.g. 4096x11008")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256], help="batch sizes (rows of x)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bw, probe = bandwidth_gbps(device)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, bandwidth_GBps=round(bw, 2), bandwidth_probe=probe)
    if not args.json:
        print(f"device {info['device']}, {info['threads']} threads, torch {info['torch']}; "
              f"bandwidth limit {bw:.1f} GB/s (fastest full read of a 1 GiB buffer: {probe})", flush=True)
    rows: list[dict] = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        shape_rows = bench_shape(n, k, args.m, device, bw, args.repeat)
        rows += shape_rows
        if not args.json:
            print_table(shape_rows)
            sys.stdout.flush()
    lines = summary(rows)
    if args.json:
        print(json.dumps({**info, "results": rows, "summary": lines}, indent=1))
    else:
        print("\nsummary:")
        for line in lines:
            print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
