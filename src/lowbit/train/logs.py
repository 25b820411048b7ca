"""Training logs: ``train_log.csv`` + ``train_log.jsonl`` (one row per logged step) and a loss-curve PNG."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

FIELDS = ("step", "loss", "lr", "tokens", "tokens_per_s", "eval_loss", "elapsed")
CSV_NAME, JSONL_NAME, PLOT_NAME = "train_log.csv", "train_log.jsonl", "loss.png"


class TrainLog:
    """Appends records to the CSV and JSONL logs in ``out_dir`` (flushed per row).

    On a resumed run (``resume_step`` given) rows past the checkpoint — written before a crash —
    are dropped first, so the logs read as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = out_dir / CSV_NAME, out_dir / JSONL_NAME
        self.records: list[dict[str, Any]] = read_records(self.jsonl_path, resume_step) if resume_step else []
        _replace(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.records))
        _replace(self.csv_path, _csv_text(self.records, header=True))

    def write(self, record: dict[str, Any]) -> None:
        row = {k: record.get(k) for k in FIELDS}
        self.records.append(row)
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", encoding="utf-8", newline="") as fh:
            fh.write(_csv_text([row], header=False))


def read_records(path: Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL log (unreadable trailing lines, e.g. cut by a crash, are skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (max_step is None or record.get("step", 0) <= max_step):
                records.append(record)
    return records


def _csv_text(rows: list[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in FIELDS})
    return buf.getvalue()


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss (and eval loss) against step as a PNG; ``None`` (with a warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the loss plot (pip install matplotlib)", stacklevel=2)
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend switch
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
