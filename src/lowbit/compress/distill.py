"""Knowledge distillation on lowbit's trainer: the student learns the teacher's next-token distribution.

    DistillTrainer(student, TrainConfig(...), train_data, teacher=float_model, temperature=1.0, alpha=1.0).train()

The loss of a step is ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, labels)
+ beta · hidden-state MSE``, summed over the label positions and divided by their count (the trainer's token
mean), forward KL by default, reverse (``KL(s ‖ t)``, mode-seeking) on request. The teacher runs without
gradients on the same batch. QAT uses it to imitate the float model instead of fitting a small corpus (which
over-fits: on the built-in LM, QAT by plain cross-entropy on its calibration text made the held-out perplexity
worse than GPTQ's start). Evaluation (``eval_loss``) is the student's plain held-out cross-entropy.

Hidden states (``hidden_weight`` = beta > 0): ``layer_map`` pairs indices into ``output_hidden_states`` (0 = the
embeddings, i = the output of block i; Hugging Face applies the final norm to the last one). Per pair, the mean
over the hidden dimension of ``(P·h_s − h_t)²`` at each label position, averaged over the pairs; ``P`` is a
learned ``Linear(d_s, d_t)`` when the widths differ (trained with the student, kept in its checkpoint).

Teacher logit cache (:func:`build_logit_cache`, ``cache=``): the teacher runs once over the training rows and
stores, per predicting position, its top-k log-probabilities at temperature T (``log p_i``, i ∈ K) and the
log-mass of everything else (``log(1 − Σ_K p_i)``, exact, from the full distribution). Training then needs no
teacher: the KL is taken between the (k+1)-bucket distributions ``(p_K, p_rest)`` and ``(q_K, q_rest)``, with
``q = softmax(s/T)`` over the full vocabulary and ``q_rest`` its exact mass outside K. This never exceeds the full
KL and equals it when k = vocabulary size.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import CorruptFileError, InvalidSpecError
from lowbit.io.writer import replace_durably
from lowbit.progress import progress
from lowbit.train.data import IGNORE_INDEX
from lowbit.train.errors import DataError
from lowbit.train.trainer import COMPUTE_DTYPES, Trainer, TrainConfig, summed_loss

KL_DIRECTIONS = ("forward", "reverse")
INITS = ("teacher", "random")
CACHE_FORMAT, CACHE_VERSION = "lowbit-teacher-topk", 1
LOG_FLOOR = -1.0e4  # log-mass of an empty bucket: exp(-1e4) is 0 in float32, but gradients stay finite


class TeacherCacheError(DataError):
    """A teacher logit cache does not fit the run: other training data, k, temperature or vocabulary."""


# ---- losses (pure functions over the label positions) ---------------------------------------------

def kl_full(s: torch.Tensor, t: torch.Tensor, temperature: float, kl: str = "forward") -> torch.Tensor:
    """Summed ``T²·KL`` between full distributions. s, t: [n, V] logits (float32)."""
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    p, a, b = (log_t, log_t, log_s) if kl == "forward" else (log_s, log_s, log_t)
    return temperature * temperature * (p.exp() * (a - b)).sum()


def kl_topk(s: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor, t_rest: torch.Tensor, temperature: float,
            kl: str = "forward") -> torch.Tensor:
    """Summed ``T²·KL`` between the (k+1)-bucket distributions (top-k tokens of the teacher + the rest).

    s: [n, V] student logits; t_logp: [n, k] teacher log-probs at temperature T of its top-k tokens
    t_index [n, k] (int); t_rest: [n] teacher log-mass outside them (-inf when k = V).
    """
    log_q = F.log_softmax(s / temperature, -1)  # [n, V]
    index = t_index.long()
    q_k = log_q.gather(-1, index)  # [n, k]
    q_rest = log_q.scatter(-1, index, LOG_FLOOR).logsumexp(-1).clamp_min(LOG_FLOOR)  # [n]
    a = torch.cat([t_logp.float(), t_rest.float().clamp_min(LOG_FLOOR)[:, None]], -1)  # teacher, [n, k+1]
    b = torch.cat([q_k, q_rest[:, None]], -1)  # student, [n, k+1]
    p, x, y = (a, a, b) if kl == "forward" else (b, b, a)
    return temperature * temperature * (p.exp() * (x - y)).sum()


def evenly_spaced(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block for each student block: ``round(linspace(0, n_teacher − 1, n_student))`` (first and last kept)."""
    if not 1 <= n_student <= n_teacher:
        raise InvalidSpecError(f"a student of {n_student} blocks cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def parse_layer_map(text: str) -> dict[int, int]:
    """``"1:2,2:4"`` → {1: 2, 2: 4} (student hidden-state index : teacher hidden-state index)."""
    pairs = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        s, sep, t = item.partition(":")
        if not sep or not s.strip().isdigit() or not t.strip().isdigit():
            raise InvalidSpecError(f"layer map entry {item!r}: expected STUDENT:TEACHER (hidden-state indices)")
        pairs[int(s)] = int(t)
    if not pairs:
        raise InvalidSpecError(f"layer map {text!r} holds no STUDENT:TEACHER pair")
    return pairs


class RowIndexed:
    """A dataset whose batches also carry ``row`` ([B] int64, the dataset row indices) — cache lookups need them."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if hasattr(self.data, "batch"):
            out = dict(self.data.batch(rows))
        else:
            items = [self.data[int(i)] for i in rows]
            out = {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}
        out["row"] = rows.clone()
        return out


# ---- the trainer ----------------------------------------------------------------------------------

class DistillTrainer(Trainer):
    """:class:`~lowbit.train.trainer.Trainer` whose loss is distillation from ``teacher`` (causal LM).

    ``cache``: a :class:`LogitCache` of the teacher over ``train_data`` (then ``teacher`` may be None);
    ``hidden_weight``/``layer_map``: the hidden-state MSE (needs the live teacher), see the module docstring.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Any, teacher: nn.Module | None = None, *,
                 temperature: float = 1.0, alpha: float = 1.0, kl: str = "forward", eval_data: Any = None,
                 callbacks: Sequence[Any] = (), cache: "LogitCache | None" = None, hidden_weight: float = 0.0,
                 layer_map: dict[int, int] | None = None) -> None:
        super().__init__(model, config, train_data, eval_data, callbacks)
        if config.task != "causal_lm":
            raise InvalidSpecError("distillation trains causal language models (task causal_lm)")
        if temperature <= 0 or not 0.0 <= alpha <= 1.0 or kl not in KL_DIRECTIONS or hidden_weight < 0:
            raise InvalidSpecError(f"distillation: temperature must be > 0, alpha in [0, 1], kl one of "
                                   f"{', '.join(KL_DIRECTIONS)}, hidden_weight ≥ 0 (got {temperature}, {alpha}, "
                                   f"{kl!r}, {hidden_weight})")
        if teacher is None and cache is None:
            raise InvalidSpecError("distillation needs a teacher model or a teacher logit cache")
        if hidden_weight > 0 and teacher is None:
            raise InvalidSpecError("the hidden-state loss needs the live teacher (a logit cache holds no hidden states)")
        self.teacher = teacher.eval() if teacher is not None else None
        for p in self.teacher.parameters() if teacher is not None else ():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.kl = temperature, alpha, kl
        self.cache, self.hidden_weight = cache, hidden_weight
        self._plain_ce = False
        if cache is not None:
            cache.check(train_data, temperature=temperature, vocab=_vocab_size(model))
            if not isinstance(train_data, RowIndexed):
                self.train_data = RowIndexed(train_data)
        self.layer_map: dict[int, int] = {}
        self.projections = nn.ModuleDict()
        if hidden_weight > 0:
            self._setup_hidden(model, teacher, layer_map)

    def _setup_hidden(self, model: nn.Module, teacher: nn.Module, layer_map: dict[int, int] | None) -> None:
        n_s, n_t = _num_layers(model), _num_layers(teacher)
        self.layer_map = dict(layer_map) if layer_map else {i + 1: j + 1 for i, j in enumerate(evenly_spaced(n_s, n_t))}
        for i, j in self.layer_map.items():
            if not (0 <= i <= n_s and 0 <= j <= n_t):
                raise InvalidSpecError(f"layer map {i}:{j}: hidden-state indices run 0..{n_s} in the student and "
                                       f"0..{n_t} in the teacher (0 = embeddings)")
        d_s, d_t = model.config.hidden_size, teacher.config.hidden_size
        if d_s != d_t:
            device = next(iter(self.named.values())).device
            gen = torch.Generator().manual_seed(self.config.seed)
            for i in self.layer_map:
                proj = nn.Linear(d_s, d_t, bias=False)
                with torch.no_grad():
                    proj.weight.copy_(torch.randn(d_t, d_s, generator=gen) / math.sqrt(d_s))
                self.projections[str(i)] = proj.to(device)
                self.named[f"distill_projection.{i}.weight"] = proj.weight

    def train(self) -> Any:
        from lowbit.train.distributed import init_distributed

        if len(self.projections) and init_distributed().enabled:
            raise InvalidSpecError("hidden-state projections (student and teacher widths differ) are not "
                                   "synchronised under DDP; train on one process or use equal widths")
        return super().train()

    def evaluate(self, dist: Any = None, device: torch.device | None = None) -> float:
        """The student's token-mean cross-entropy on the eval data (not the distillation loss)."""
        self._plain_ce = True
        try:
            return super().evaluate(dist, device)
        finally:
            self._plain_ce = False

    def _loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._plain_ce:
            return summed_loss(model, batch, "causal_lm", self.config.compute_dtype)
        dtype = COMPUTE_DTYPES[self.config.compute_dtype]
        device_type = batch["input_ids"].device.type
        hidden = self.hidden_weight > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext():
            out = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
        logits = out.logits
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        s = logits[:, :-1][keep].float()  # [n, V] at the label positions
        total = torch.zeros((), device=s.device)
        t_out = None
        if self.teacher is not None and (self.cache is None or hidden):
            with torch.no_grad():
                t_out = self.teacher(**inputs, output_hidden_states=True) if hidden else self.teacher(**inputs)
        if self.alpha > 0:
            if self.cache is not None:
                if "row" not in batch:
                    raise InvalidSpecError("a cached-teacher batch carries no 'row' indices (wrap the data in RowIndexed)")
                t_logp, t_index, t_rest = (x.to(s.device) for x in self.cache.rows(batch["row"].cpu()))
                if self.cache.vocab != logits.shape[-1]:
                    raise InvalidSpecError(f"{self.cache.path}: the teacher's vocabulary has {self.cache.vocab} "
                                           f"tokens, the student's {logits.shape[-1]}: distillation needs the same "
                                           "tokenizer")
                kd = kl_topk(s, t_logp[keep], t_index[keep], t_rest[keep], self.temperature, self.kl)
            else:
                teacher = t_out.logits
                if teacher.shape[-1] != logits.shape[-1]:
                    raise InvalidSpecError(f"teacher and student vocabularies differ ({teacher.shape[-1]} vs "
                                           f"{logits.shape[-1]} logits): distillation needs the same tokenizer")
                kd = kl_full(s, teacher[:, :-1][keep].float(), self.temperature, self.kl)
            total = total + self.alpha * kd
        if self.alpha < 1:
            total = total + (1 - self.alpha) * F.cross_entropy(s, labels[keep], reduction="sum")
        if hidden:
            total = total + self.hidden_weight * self._hidden_mse(out.hidden_states, t_out.hidden_states, keep)
        return total

    def _hidden_mse(self, h_s: Sequence[torch.Tensor], h_t: Sequence[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=keep.device)
        for i, j in self.layer_map.items():
            a, b = h_s[i][:, :-1][keep].float(), h_t[j][:, :-1][keep].float()  # [n, d_s], [n, d_t]
            if str(i) in self.projections:
                a = self.projections[str(i)](a)
            total = total + ((a - b) ** 2).mean(-1).sum()
        return total / max(len(self.layer_map), 1)


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(head, "out_features", None)
    return int(size) if size is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def _num_layers(model: nn.Module) -> int:
    from lowbit.algorithms.calibrate import find_blocks

    return len(find_blocks(model)[1])


# ---- the teacher logit cache ----------------------------------------------------------------------

def dataset_fingerprint(data: Any) -> str:
    """sha256 over the rows' input_ids, attention_mask and labels (shapes included), in row order."""
    inner = data.data if isinstance(data, RowIndexed) else data
    tensors = inner.tensors if hasattr(inner, "tensors") else inner.batch(torch.arange(len(inner)))
    digest = hashlib.sha256()
    for name in ("input_ids", "attention_mask", "labels"):
        t = tensors[name].to(torch.int64).contiguous()
        digest.update(f"{name}{list(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def build_logit_cache(teacher: nn.Module, data: Any, path: str | Path, *, k: int = 64, temperature: float = 1.0,
                      batch_size: int = 8, value_dtype: torch.dtype = torch.float16,
                      show_progress: bool = True) -> "LogitCache":
    """Run ``teacher`` once over every row of ``data`` and write its top-k to the safetensors file ``path``.

    One chunk per batch of rows c (rows ``[c·batch_size, …)``), tensors ``logp.{c:05d}`` [b, S−1, k]
    (``value_dtype``), ``index.{c:05d}`` [b, S−1, k] int32 and ``rest.{c:05d}`` [b, S−1] float32; position p
    holds the teacher's distribution for token p+1. Written chunk by chunk to a temp file, fsynced, renamed.
    """
    from lowbit.io.st_format import StreamingFile

    if temperature <= 0 or batch_size < 1 or value_dtype not in (torch.float16, torch.float32):
        raise InvalidSpecError("teacher cache: temperature must be > 0, batch_size ≥ 1, values float16 or float32")
    path = Path(path)
    n = len(data)
    first = _rows(data, torch.arange(min(batch_size, n)))
    seq_len, vocab = first["input_ids"].shape[1], _vocab_size(teacher)
    if vocab is None or not 1 <= k <= vocab:
        raise InvalidSpecError(f"teacher cache: k must lie in 1..{vocab} (the vocabulary size), got {k}")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = StreamingFile(tmp)
    try:
        starts = range(0, n, batch_size)
        for c, start in enumerate(progress(starts, total=len(starts), desc="teacher top-k", enabled=show_progress,
                                           unit="batch")):
            batch = _rows(data, torch.arange(start, min(start + batch_size, n)))
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            logp = F.log_softmax(logits / temperature, -1)  # [b, S-1, V]
            values, index = logp.topk(k, -1)
            rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1)  # [b, S-1]
            out.add(f"logp.{c:05d}", values.to(value_dtype))
            out.add(f"index.{c:05d}", index.to(torch.int32))
            out.add(f"rest.{c:05d}", rest)
        meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "rows": str(n), "seq_len": str(seq_len),
                "k": str(k), "vocab": str(vocab), "temperature": repr(float(temperature)),
                "chunk_rows": str(batch_size), "fingerprint": dataset_fingerprint(data),
                "teacher": str(getattr(teacher, "lowbit_source", "") or type(teacher).__name__)}
        out.close(meta)
        replace_durably(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        teacher.train(was_training)
    return LogitCache(path)


def _rows(data: Any, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(data, "batch"):
        return data.batch(rows)
    items = [data[int(i)] for i in rows]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


class LogitCache:
    """A teacher top-k cache written by :func:`build_logit_cache`, read row by row (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherCacheError(f"{self.path}: teacher cache not found")
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CorruptFileError(f"{self.path}: not a readable safetensors file ({exc})") from None
        meta = self._file.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise CorruptFileError(f"{self.path}: not a lowbit teacher cache (metadata format {meta.get('format')!r})")
        if meta.get("version") != str(CACHE_VERSION):
            raise CorruptFileError(f"{self.path}: cache version {meta.get('version')!r}, this lowbit reads "
                                   f"{CACHE_VERSION}")
        try:
            self.rows_total, self.seq_len, self.k, self.vocab, self.chunk_rows = (
                int(meta[key]) for key in ("rows", "seq_len", "k", "vocab", "chunk_rows"))
            self.temperature, self.fingerprint = float(meta["temperature"]), meta["fingerprint"]
        except (KeyError, ValueError) as exc:
            raise CorruptFileError(f"{self.path}: metadata field {exc} missing or not a number") from None
        self._validate_tensors()

    def _validate_tensors(self) -> None:
        keys = set(self._file.keys())
        chunks = math.ceil(self.rows_total / max(self.chunk_rows, 1))
        for c in range(chunks):
            b = min(self.chunk_rows, self.rows_total - c * self.chunk_rows)
            want = {"logp": ([b, self.seq_len - 1, self.k], ("F16", "F32")),
                    "index": ([b, self.seq_len - 1, self.k], ("I32",)),
                    "rest": ([b, self.seq_len - 1], ("F32",))}
            for kind, (shape, dtypes) in want.items():
                name = f"{kind}.{c:05d}"
                if name not in keys:
                    raise CorruptFileError(f"{self.path}: tensor {name} missing ({chunks} chunks expected)")
                view = self._file.get_slice(name)
                if list(view.get_shape()) != shape or view.get_dtype() not in dtypes:
                    raise CorruptFileError(f"{self.path}: tensor {name} is {view.get_dtype()} {view.get_shape()}, "
                                           f"expected {'/'.join(dtypes)} {shape}")
        if len(keys) != 3 * chunks:
            raise CorruptFileError(f"{self.path}: {len(keys)} tensors, expected {3 * chunks}")

    def check(self, data: Any, *, k: int | None = None, temperature: float | None = None,
              vocab: int | None = None) -> None:
        """Raise :class:`TeacherCacheError` unless the cache was built over ``data`` with these settings."""
        first = _rows(data, torch.arange(1))
        mismatches = []
        if len(data) != self.rows_total or first["input_ids"].shape[1] != self.seq_len:
            mismatches.append(f"rows × seq_len {self.rows_total} × {self.seq_len} vs the data's "
                              f"{len(data)} × {first['input_ids'].shape[1]}")
        elif dataset_fingerprint(data) != self.fingerprint:
            mismatches.append("the token rows differ (dataset fingerprint): other text, tokenizer or split")
        if k is not None and k != self.k:
            mismatches.append(f"k {self.k} vs {k} requested")
        if temperature is not None and not math.isclose(temperature, self.temperature):
            mismatches.append(f"temperature {self.temperature} vs {temperature}")
        if vocab is not None and vocab != self.vocab:
            mismatches.append(f"vocabulary {self.vocab} vs the student's {vocab} (distillation needs the same "
                              "tokenizer)")
        if mismatches:
            raise TeacherCacheError(f"{self.path}: the teacher cache does not match this run: "
                                    f"{'; '.join(mismatches)} — delete it to rebuild")

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp [B, S−1, k] float32, index [B, S−1, k] int64, rest [B, S−1] float32) of dataset ``rows``."""
        parts: dict[str, list[torch.Tensor]] = {"logp": [], "index": [], "rest": []}
        for r in rows.tolist():
            if not 0 <= r < self.rows_total:
                raise TeacherCacheError(f"{self.path}: row {r} outside the cache's {self.rows_total} rows")
            c, o = divmod(r, self.chunk_rows)
            for kind in parts:
                parts[kind].append(self._file.get_slice(f"{kind}.{c:05d}")[o : o + 1])
        logp, index, rest = (torch.cat(parts[kind]) for kind in ("logp", "index", "rest"))
        return logp.float(), index.long(), rest


# ---- students ---------------------------------------------------------------------------------------

def student_from_config(teacher: nn.Module, config: dict[str, Any], *, init: str = "random", seed: int = 0,
                        where: str = "student config") -> nn.Module:
    """A new float causal LM: ``config`` is a full config (it has ``model_type``) or overrides of the teacher's.

    ``init="teacher"`` copies the teacher's weights (:func:`init_from_teacher`), ``"random"`` keeps the
    architecture's own initialisation (seeded by ``seed``). The student shares the teacher's tokenizer.
    """
    import transformers

    if init not in INITS:
        raise InvalidSpecError(f"{where}: init {init!r}; choose one of {', '.join(INITS)}")
    full = "model_type" in config
    values = dict(config) if full else {**teacher.config.to_dict(), **config}
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        values.pop(key, None)
    model_type = values.pop("model_type")
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **values)
        torch.manual_seed(seed)
        student = transformers.AutoModelForCausalLM.from_config(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidSpecError(f"{where}: cannot build a causal LM from it ({exc})") from None
    student = student.float()
    if _vocab_size(student) != _vocab_size(teacher):
        raise InvalidSpecError(f"{where}: vocab_size {_vocab_size(student)} differs from the teacher's "
                               f"{_vocab_size(teacher)}; distillation needs the same tokenizer")
    if init == "teacher":
        init_from_teacher(student, teacher)
    student.lowbit_source = getattr(teacher, "lowbit_source", None)  # type: ignore[attr-defined]
    student.lowbit_method = None  # type: ignore[attr-defined]
    return student


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, layers: Sequence[int] | None = None) -> list[int]:
    """Copy the teacher's weights into the student (DistilBERT-style); returns the teacher block of each student block.

    Student block i gets teacher block ``layers[i]`` (default :func:`evenly_spaced`); embeddings, norms and the
    head are copied by name. Every copied tensor must have the same shape (equal widths), else an error names it.
    """
    from lowbit.algorithms.calibrate import find_blocks

    prefix_s, blocks_s = find_blocks(student)
    prefix_t, blocks_t = find_blocks(teacher)
    layers = list(layers) if layers is not None else evenly_spaced(len(blocks_s), len(blocks_t))
    if len(layers) != len(blocks_s) or not all(0 <= j < len(blocks_t) for j in layers):
        raise InvalidSpecError(f"init from teacher: {len(blocks_s)} student blocks need as many teacher blocks in "
                               f"0..{len(blocks_t) - 1}, got {layers}")
    source = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        src = name
        if name.startswith(prefix_s + "."):
            index, rest = name[len(prefix_s) + 1:].split(".", 1)
            src = f"{prefix_t}.{layers[int(index)]}.{rest}"
        if src not in source:
            raise InvalidSpecError(f"init from teacher: the teacher has no float tensor {src} for the student's {name} "
                                   "(a quantized or different architecture? use init random)")
        if source[src].shape != tensor.shape:
            raise InvalidSpecError(f"init from teacher: {name} is {list(tensor.shape)} in the student, {src} is "
                                   f"{list(source[src].shape)} in the teacher; copying needs equal widths "
                                   "(use init random)")
        tensor.copy_(source[src])
    return layers


def check_same_tokenizer(a: Any, b: Any, a_name: str, b_name: str) -> None:
    """Raise :class:`InvalidSpecError` unless the two tokenizers map every token to the same id."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = next((tok for tok in sorted(set(va) | set(vb)) if va.get(tok) != vb.get(tok)), None)
        raise InvalidSpecError(f"the tokenizers of {a_name} ({len(va)} tokens) and {b_name} ({len(vb)} tokens) "
                               f"differ: token {diff!r} is id {va.get(diff)} vs {vb.get(diff)}; distillation needs "
                               "the same tokenizer")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise InvalidSpecError(f"the tokenizers of {a_name} and {b_name} differ in {attr} "
                                   f"({getattr(a, attr, None)} vs {getattr(b, attr, None)})")
