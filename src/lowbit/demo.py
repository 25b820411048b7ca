"""``lowbit demo``: quantize the built-in LM to a few formats and compare size and perplexity."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
from lowbit.eval.size import model_size
from lowbit.formats.spec import QuantSpec
from lowbit.io.checkpoint import load
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import quantize

DEMO_SPECS: list[tuple[str, QuantSpec | None]] = [
    ("fp32", None),
    ("int8 (per-channel, sym)", QuantSpec.int_(8, None, symmetric=True)),
    ("int4-g128 (asym)", QuantSpec.int_(4, 128, symmetric=False)),
    ("nf4 (block 64, double quant)", QuantSpec.nf4(64, double_quant=True)),
]


@dataclass
class DemoRow:
    name: str
    size_bytes: int
    linear_bytes: int
    bits_per_weight: float
    ppl: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size_bytes, "linear_weight_bytes": self.linear_bytes,
                "bits_per_weight": round(self.bits_per_weight, 4), "ppl": round(self.ppl, 4),
                "seconds": round(self.seconds, 3)}


def run_demo(model_ref: str = "builtin:tiny-lm", *, seq_len: int = 256, show_progress: bool = True) -> list[DemoRow]:
    from transformers import AutoTokenizer

    float_model = load(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(float_model.lowbit_source))
    ids = tokenize_text(tokenizer, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    rows = []
    for name, spec in DEMO_SPECS:
        start = time.perf_counter()
        model = float_model if spec is None else quantize(copy.deepcopy(float_model), spec)
        size = model_size(model)
        result = perplexity(model, ids, seq_len=seq_len, show_progress=show_progress)
        rows.append(DemoRow(name, size.size_bytes, size.linear_bytes, size.bits_per_weight, result.ppl,
                            time.perf_counter() - start))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = f"{'format':<30} {'size (MB)':>10} {'linear (MB)':>12} {'bits/weight':>12} {'perplexity':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<30} {r.size_bytes / 1e6:>10.2f} {r.linear_bytes / 1e6:>12.2f} "
                     f"{r.bits_per_weight:>12.3f} {r.ppl:>11.3f}")
    return "\n".join(lines)
