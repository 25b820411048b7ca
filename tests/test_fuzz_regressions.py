"""Regression tests for the failures the reader fuzzers (test_fuzz_readers.py) found: one row per distinct
failure, fixed in the reader — its minimal input, what escaped before the fix, and the typed error (or, with
``error=None``, the success) expected now. ``FIXED`` also gives ``make fuzz`` its per-reader "fixed" counts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import bounded, clone_dir

from lowbit.errors import CorruptFileError, InvalidSpecError, LowbitError, ShapeError
from lowbit.train.errors import DataError
from test_fuzz_readers import _forward, adapter_seeds, model_seeds, tokenizer  # noqa: F401  (fixtures used here)

# ------------------------------------------------------------------------------------------- regression tests
# One row per distinct failure the fuzzer found and that was fixed in the reader: the minimal input, what escaped
# before the fix, and the typed error (or, with ``error=None``, the success) expected now.

RAW = "@RAW@"  # a JSON value written as raw text (a nesting or a number json.dumps would not write)


def _json_text(data: Any, raw: str = "") -> bytes:
    return json.dumps(data).replace(json.dumps(RAW), raw).encode()


def _edit_json(seed: Path, case: Path, name: str, edit: Any, raw: str = "") -> Path:
    """``case`` := ``seed`` with the JSON file ``name`` changed by ``edit(data)`` (``RAW`` values become ``raw``)."""
    data = json.loads((seed / name).read_text())
    edit(data)
    clone_dir(seed, case, {name: _json_text(data, raw)})
    return case


def _edit_header(seed: Path, case: Path, name: str, edit: Any) -> Path:
    """``case`` := ``seed`` with the header of safetensors file ``name`` changed by ``edit(header)``."""
    blob = (seed / name).read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    clone_dir(seed, case, {name: struct.pack("<Q", len(text)) + text + blob[8 + n:]})
    return case


def _models(request: pytest.FixtureRequest) -> list[Path]:
    return request.getfixturevalue("model_seeds")


def _load(path: Path) -> Any:
    import lowbit

    model = lowbit.load(path)
    _forward(model)
    return model


def _model_case(index: int, name: str, edit: Any, raw: str = "") -> Any:
    return lambda tmp, request: _load(_edit_json(_models(request)[index], tmp / "case", name, edit, raw))


def _set(key: str, value: Any) -> Any:
    return lambda data: data.__setitem__(key, value)


def _qcfg(key: str, value: Any) -> Any:
    return lambda data: data["quantization_config"].__setitem__(key, value)


def _lazy_wrong_qdata_dtype(tmp: Path, request: pytest.FixtureRequest) -> Any:
    import lowbit

    key = "model.layers.0.self_attn.k_proj.qdata"  # int8 codes, re-labelled as float8 (same size)
    case = _edit_header(_models(request)[4], tmp / "case", "model.safetensors",
                        lambda h: h[key].__setitem__("dtype", "F8_E5M2"))
    lowbit.load(case, lazy_blocks=True).lowbit_lazy_blocks.materialize(0)


def _float_weight_as_int(tmp: Path, request: pytest.FixtureRequest) -> Any:
    return _load(_edit_header(_models(request)[0], tmp / "case", "model.safetensors",
                              lambda h: h["model.norm.weight"].__setitem__("dtype", "I32")))


def _bounded(run: Any) -> Any:
    """``run`` within the fuzz bounds of one case (1 s, 100 MB): for failures that were a hang or a blow-up."""
    def bounded_run(tmp: Path, request: pytest.FixtureRequest) -> Any:
        for name in ("model_seeds", "adapter_seeds", "tokenizer"):  # fixtures are built outside the bounds
            request.getfixturevalue(name)
        with bounded():
            return run(tmp, request)
    return bounded_run


def _recipe(text: str, suffix: str = ".yaml") -> Any:
    def run(tmp: Path, request: pytest.FixtureRequest) -> Any:
        from lowbit import QuantRecipe

        path = tmp / f"recipe{suffix}"
        path.write_text(text)
        return QuantRecipe.load(path)
    return run


def _calib_jsonl(lines: str) -> Any:
    def run(tmp: Path, request: pytest.FixtureRequest) -> Any:
        from lowbit.algorithms.calib_data import CalibConfig, calibration_batches

        path = tmp / "calib.jsonl"
        path.write_text(lines)
        return calibration_batches(request.getfixturevalue("tokenizer"), CalibConfig(str(path), samples=1, seq_len=2))
    return run


def _dataset_with_bad_offsets(tmp: Path, request: pytest.FixtureRequest) -> Any:
    """A saved dataset whose Arrow string column's last offset points 2 GB past its data."""
    datasets = pytest.importorskip("datasets")
    from lowbit.algorithms.calib_data import CalibConfig, read_calibration_text

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(tmp / "ds"))
    arrow = next((tmp / "ds").glob("*.arrow"))
    blob = arrow.read_bytes()
    at = blob.find(struct.pack("<3i", 0, 10, 15))
    arrow.write_bytes(blob[:at + 8] + struct.pack("<i", 2**31 - 1) + blob[at + 12:])
    return read_calibration_text(CalibConfig(str(tmp / "ds")))


def _dataset_bad_name(tmp: Path, request: pytest.FixtureRequest) -> Any:
    """A saved dataset whose Arrow schema names its column with bytes that are not UTF-8."""
    datasets = pytest.importorskip("datasets")
    from lowbit.algorithms.calib_data import CalibConfig, read_calibration_text

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(tmp / "ds"))
    arrow = next((tmp / "ds").glob("*.arrow"))
    blob = arrow.read_bytes()
    at = blob.find(b"text\x00")  # the field name in the schema's flatbuffer
    arrow.write_bytes(blob[:at] + b"\x81" + blob[at + 1:])
    return read_calibration_text(CalibConfig(str(tmp / "ds")))


def _dataset_listed_twice(tmp: Path, request: pytest.FixtureRequest) -> Any:
    """A saved dataset whose state.json lists its one Arrow file 2,500 times."""
    datasets = pytest.importorskip("datasets")
    from lowbit.algorithms.calib_data import CalibConfig, read_calibration_text

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(tmp / "ds"))
    state = json.loads((tmp / "ds" / "state.json").read_text())
    state["_data_files"] = state["_data_files"] * 2500
    (tmp / "ds" / "state.json").write_text(json.dumps(state))
    with bounded():
        return read_calibration_text(CalibConfig(str(tmp / "ds")))


def _train_jsonl(records: list[Any], classes: bool = False) -> Any:
    def run(tmp: Path, request: pytest.FixtureRequest) -> Any:
        from lowbit.train.data import load_causal_lm_data, load_classification_data

        path = tmp / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tok = request.getfixturevalue("tokenizer")
        return load_classification_data(path, tok, 8) if classes else load_causal_lm_data(path, tok, 8)
    return run


def _adapter(which: str, index: int, name: str, edit: Any, raw: str = "", text: bytes | None = None) -> Any:
    """Load adapter seed ``index`` of ``which`` ("lowbit" through load_with_adapter, "peft" through load_adapter)
    with its file ``name`` edited as JSON (or replaced by ``text``)."""
    def run(tmp: Path, request: pytest.FixtureRequest) -> Any:
        import lowbit
        from lowbit.peft import load_adapter, load_with_adapter

        seed = request.getfixturevalue("adapter_seeds")[which][index]
        base = _models(request)[0]
        if text is not None:
            clone_dir(seed, tmp / "case", {name: text})
        else:
            _edit_json(seed, tmp / "case", name, edit, raw)
        if which == "lowbit":
            return load_with_adapter(base, tmp / "case")
        return load_adapter(lowbit.load(base), tmp / "case")
    return run


class Fixed:
    """One fixed failure: the reader whose fuzzing found it, the input, what escaped before, and what is expected now
    (``error`` None: the input now reads and runs)."""

    def __init__(self, reader: str, what: str, before: str, error: type[LowbitError] | None, match: str,
                 run: Any) -> None:
        self.reader, self.what, self.before, self.error, self.match, self.run = reader, what, before, error, match, run


FIXED: list[Fixed] = [
    # ---- model directories (lowbit.load)
    Fixed("model_dir", "config.json: a value nested 5000 lists deep", "RecursionError", CorruptFileError,
          "nested too deeply", _model_case(0, "config.json", _set("pretraining_tp", RAW), "[" * 5000 + "]" * 5000)),
    Fixed("model_dir", "config.json: an integer of 5000 digits", "ValueError (int digit limit)", CorruptFileError,
          "invalid JSON", _model_case(0, "config.json", _set("vocab_size", RAW), "9" * 5000)),
    Fixed("model_dir", "model.safetensors: a float weight's dtype relabelled I32", "RuntimeError (load_state_dict)",
          CorruptFileError, "model.norm.weight has dtype torch.int32", _float_weight_as_int),
    Fixed("model_dir", "model.safetensors.index.json: a weight_map value that is a number", "TypeError (sorted)",
          CorruptFileError, "weight_map",
          _model_case(1, "model.safetensors.index.json",
                      lambda d: d["weight_map"].__setitem__(next(iter(d["weight_map"])), 7))),
    Fixed("model_dir", 'config.json: "quantization_config": "auto"', "AttributeError", CorruptFileError,
          "quantization_config must be an object", _model_case(2, "config.json", _set("quantization_config", "auto"))),
    Fixed("model_dir", 'config.json: "output_hidden_states": NaN', "TypeError (in the forward)", CorruptFileError,
          "output_hidden_states must be true or false", _model_case(0, "config.json", _set("output_hidden_states", RAW),
                                                                    "NaN")),
    Fixed("model_dir", 'config.json: "return_dict": false', "AttributeError (transformers' forward)", None, "",
          _model_case(0, "config.json", _set("return_dict", False))),
    Fixed("model_dir", "lazy blocks: int8 layer's uint8 qdata relabelled F8_E5M2", "NotImplementedError (kernel)",
          CorruptFileError, "dtype torch.float8_e5m2, expected torch.uint8", _lazy_wrong_qdata_dtype),
    Fixed("model_dir", "quantization_config.shared_embeddings: {name: [a list]}", "TypeError (unhashable)",
          CorruptFileError, "which is not a quantized module",
          _model_case(3, "config.json", lambda d: d["quantization_config"]["shared_embeddings"].__setitem__(
              "model.embed_tokens", ["lm_head"]))),
    Fixed("model_dir", "config.json: tie_word_embeddings true over a quantized, shared head", "AttributeError",
          CorruptFileError, "tie_word_embeddings", _model_case(3, "config.json", _set("tie_word_embeddings", True))),
    Fixed("gptq_dir", 'config.json: "initializer_range": a 400-digit integer', "OverflowError (math.isfinite)",
          CorruptFileError, "initializer_range must be a finite number",
          _model_case(0, "config.json", _set("initializer_range", RAW), "9" * 400)),
    # ---- recipes (QuantRecipe.load)
    Fixed("recipe_yaml", "skip: [[lm_head]]", "TypeError (unhashable / re.compile)", InvalidSpecError,
          "skip must be a list of layer names", _recipe("default: {format: int}\nskip: [[lm_head]]\n")),
    Fixed("recipe_yaml", "include: 5", "TypeError (not iterable)", InvalidSpecError,
          "include must be a list of layer names", _recipe("default: {format: int}\ninclude: 5\n")),
    Fixed("recipe_json", '"options": 3', "AttributeError", InvalidSpecError, "options must be an object",
          _recipe('{"default": {"format": "int"}, "options": 3}', ".json")),
    Fixed("recipe_json", '"overrides": 1.5', "TypeError (not iterable)", InvalidSpecError,
          "overrides must be a list", _recipe('{"default": {"format": "int"}, "overrides": 1.5}', ".json")),
    Fixed("recipe_yaml", "method: llm-int8 with options: {threshold: x}", "TypeError (W8A8Options)", InvalidSpecError,
          "threshold must be a finite float",
          _recipe("default: {format: int, bits: 8, group_size: null, granularity: channel}\nmethod: llm-int8\n"
                  "options: {threshold: x}\n")),
    Fixed("recipe_yaml", "a value nested 100 000 flow lists deep", "1.7 s in PyYAML's pure-Python scanner",
          InvalidSpecError, "cannot parse recipe",
          _bounded(_recipe("default: " + "[" * 100_000 + "]" * 100_000 + "\n"))),
    # ---- calibration data (calibration_batches)
    Fixed("calib_jsonl", r'{"text": "\ud800"} (a lone surrogate escape)', "TypeError (tokenizer)", InvalidSpecError,
          "lone UTF-16 surrogate", _calib_jsonl('{"text": "ok"}\n{"text": "\\ud800"}\n')),
    Fixed("calib_dataset", "a saved dataset whose Arrow string offsets point past the data", "a Bus error (SIGBUS: "
          "the process died in pyarrow)", CorruptFileError, "not a valid Arrow stream", _dataset_with_bad_offsets),
    Fixed("calib_dataset", "an Arrow schema whose field name is not UTF-8 (a flipped byte)", "UnicodeDecodeError "
          "(from pyarrow inside datasets)", CorruptFileError, "not a valid Arrow stream", _dataset_bad_name),
    Fixed("calib_dataset", "state.json: _data_files naming the one Arrow file 2,500 times", "2.7 s and 380 MB "
          "(datasets maps the file once per entry)", CorruptFileError, "more than once", _dataset_listed_twice),
    # ---- training data (load_causal_lm_data, load_classification_data)
    Fixed("train_jsonl", "chat messages whose roles do not alternate (the template raises)", "jinja2 TemplateError",
          DataError, "chat template rejects",
          _train_jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}])),
    Fixed("train_jsonl", '{"messages": []}', "ValueError (apply_chat_template)", DataError, "'messages' is empty",
          _train_jsonl([{"messages": []}])),
    Fixed("train_jsonl", "one chat record of 10,000 turns", "a hang (the template rendered once per assistant turn "
          "over the whole conversation: quadratic)", None, "",
          _bounded(_train_jsonl([{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
                                               for i in range(10000)]}]))),
    Fixed("train_classes", '{"text": "a", "label": 18446744073709551616}', "a hang building 2^64 class names",
          DataError, "not a class id below", _bounded(_train_jsonl([{"text": "a", "label": 2**64}], classes=True))),
    # ---- adapter directories (load_with_adapter: lowbit's; load_adapter: peft's)
    Fixed("adapter_lowbit", "adapter_config.json: a value nested 5000 lists deep", "RecursionError", CorruptFileError,
          "nested too deeply", _adapter("lowbit", 1, "adapter_config.json", _set("r", RAW), "[" * 5000 + "]" * 5000)),
    Fixed("adapter_lowbit", "lowbit_finetune.json: bytes that are not UTF-8", "UnicodeDecodeError", CorruptFileError,
          "invalid JSON", _adapter("lowbit", 0, "lowbit_finetune.json", None, text=b'{"base": "\xff"}')),
    Fixed("adapter_lowbit", '"target_modules": 2147483647', "TypeError (not iterable)", InvalidSpecError,
          "target_modules must be", _adapter("lowbit", 6, "adapter_config.json", _set("target_modules", 2**31 - 1))),
    Fixed("adapter_lowbit", '"modules_to_save": [null]', "TypeError (str + None)", InvalidSpecError,
          "modules_to_save must be", _adapter("lowbit", 6, "adapter_config.json", _set("modules_to_save", [None]))),
    Fixed("adapter_lowbit", 'AdaLoRA "lora_alpha": "gptq"', "TypeError (str > int)", InvalidSpecError,
          "lora_alpha must be a finite number", _adapter("lowbit", 6, "adapter_config.json",
                                                         _set("lora_alpha", "gptq"))),
    Fixed("adapter_lowbit", '"rank_pattern": "lowbit"', "AttributeError (str.items)", InvalidSpecError,
          "rank_pattern must be a dict", _adapter("lowbit", 1, "adapter_config.json", _set("rank_pattern", "lowbit"))),
    Fixed("adapter_lowbit", 'AdaLoRA "init_r": 2^53 + 1', "RuntimeError (a 2^60-byte allocation)", InvalidSpecError,
          "init_r=9007199254740993 is larger", _adapter("lowbit", 6, "adapter_config.json", _set("init_r", 2**53 + 1))),
    Fixed("adapter_lowbit", 'prompt tuning "num_virtual_tokens": 2^31', "RuntimeError (a 512 GB allocation)",
          ShapeError, "num_virtual_tokens", _adapter("lowbit", 3, "adapter_config.json",
                                                     _set("num_virtual_tokens", 2**31))),
    Fixed("adapter_lowbit", '"lora_alpha": a 400-digit integer', "OverflowError (alpha / r)", InvalidSpecError,
          "lora_alpha must be a finite number", _adapter("lowbit", 1, "adapter_config.json", _set("lora_alpha", RAW),
                                                         "9" * 400)),
    Fixed("adapter_lowbit", '"lora_alpha": 1e300 (a QLoRA adapter)', "RuntimeError (torch.add's alpha overflows "
          "float)", InvalidSpecError, "past float32's range", _adapter("lowbit", 0, "adapter_config.json",
                                                                       _set("lora_alpha", 1e300))),
    Fixed("adapter_lowbit", '"target_modules": "["', "re.error", InvalidSpecError, "not a regular expression",
          _adapter("lowbit", 1, "adapter_config.json", _set("target_modules", "["))),
    Fixed("adapter_peft", 'prefix tuning "num_virtual_tokens": 2097152', "256 MB allocated for the prefix", ShapeError,
          "num_virtual_tokens",
          _bounded(_adapter("peft", 4, "adapter_config.json", _set("num_virtual_tokens", 2**21)))),
]


def test_act_spec_integer_past_the_float_range() -> None:
    """Found by review next to the fuzzer's config_check OverflowError: the same check in ActSpec (read from a
    quantization_config's ``activations``)."""
    from lowbit.formats.act import ActSpec

    with pytest.raises(InvalidSpecError, match="outlier_threshold"):
        ActSpec.from_dict({"bits": 8, "dynamic": True, "granularity": "token", "outlier_threshold": 10**400})


@pytest.mark.parametrize("fixed", FIXED, ids=lambda f: f"{f.reader}: {f.what}")
def test_fixed_failure(fixed: Fixed, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A failure the fuzzer found stays fixed: its minimal input now raises the typed error (or reads)."""
    if fixed.error is None:
        fixed.run(tmp_path, request)
        return
    with pytest.raises(fixed.error, match=fixed.match):
        fixed.run(tmp_path, request)
