"""Seeded mutational fuzzing of every lowbit file reader (GGUF: test_gguf_fuzz.py, test_gguf_import_fuzz.py).

Each test makes real seed files with lowbit's (or transformers'/peft's) own writers, then runs
``LOWBIT_FUZZ_CASES`` mutated copies (default 500 per reader) through the reader with
:func:`fuzz_support.run_cases`: every case must end in success or a :class:`~lowbit.errors.LowbitError`
within 1 s and 100 MB of extra memory. Readers:

==================  ====================================================================================
model_dir           ``lowbit.load``: config.json (+ quantization_config), safetensors (single, sharded + index)
gptq_dir            ``lowbit.load`` of GPTQ-format directories (v1/v2, sym/asym, 3/4/8-bit, act-order)
recipe_yaml/_json   ``QuantRecipe.load`` (+ the method's typed options, specs of a few layer names)
calib_txt/_jsonl/   ``calibration_batches`` (read_calibration_text + tokenizing + windows) over a .txt, a .jsonl,
calib_dir           a directory of texts
calib_dataset       the same over a ``datasets`` directory (only where ``datasets`` is installed)
train_txt/_dir      ``load_causal_lm_data`` over a .txt and a directory of texts
train_jsonl         ``load_causal_lm_data`` over JSONL text / prompt+response / chat-messages records
train_classes       ``load_classification_data``
adapter_lowbit      ``load_with_adapter`` over directories ``lowbit.peft.finetune``/``save_adapter`` wrote
adapter_peft        ``load_adapter`` over directories Hugging Face peft wrote
==================  ====================================================================================

test_fuzz_regressions.py holds one regression test per failure the fuzzer found (and that was fixed in the
reader), listed in its ``FIXED``; ``make fuzz`` prints the per-reader figures.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_support import (
    clone_dir,
    fresh_dir,
    mutate_bytes,
    mutate_file_of_dir,
    mutate_json_text,
    mutate_jsonl,
    mutate_text,
    mutate_text_dir,
    mutate_yaml_text,
    n_cases,
    run_cases,
)

CASES = n_cases(500)
IDS = torch.tensor([[1, 2, 3, 4]])


def _tiny_llama(path: Path, *, tie: bool = False, seed: int = 0, kv_heads: int = 1) -> Path:
    """A 1-block Llama (hidden 32, 2 heads, vocab 64) saved by transformers' save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _finish(report: Any, rows: list[Any] | None = None) -> None:
    """Print the report (and the failures this reader's fuzzing found and that were fixed: ``rows``, by default
    test_fuzz_regressions.FIXED); fail on any failure."""
    if rows is None:
        from test_fuzz_regressions import FIXED as rows
    fixed = [f for f in rows if f.reader == report.reader]
    report.fixed = len(fixed)
    print("\n" + report.summary())
    for f in fixed:
        print(f"  fixed: {f.what} — was {f.before}; now {f.error.__name__ if f.error else 'reads'}")
    assert not report.failures, f"{len(report.failures)} failing cases, e.g.:\n" + "\n".join(report.failures[:20])


def _forward(model: Any) -> None:
    """A loaded model must run (a reader that accepts weights it cannot compute with has a bug)."""
    with torch.no_grad():
        model(input_ids=IDS)


# ------------------------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def model_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Float (single file and sharded), mixed-precision quantized, shared tied head, LLM.int8 directories."""
    import lowbit
    from lowbit import LayerOverride, QuantRecipe, QuantSpec

    root = tmp_path_factory.mktemp("fuzz_models")
    float_dir = _tiny_llama(root / "float")
    tied_dir = _tiny_llama(root / "tied-float", tie=True, seed=1)
    lowbit.save(lowbit.load(float_dir), root / "sharded", max_shard_bytes=8192)
    mixed = QuantRecipe(QuantSpec.int_(4, 16, symmetric=False),
                        overrides=(LayerOverride("down_proj", QuantSpec.nf4(16, double_quant=False)),
                                   LayerOverride("o_proj", QuantSpec.fp8()),
                                   LayerOverride("gate_proj", QuantSpec.int_(8, None))))
    lowbit.save(lowbit.quantize(lowbit.load(float_dir), mixed), root / "mixed")
    shared = QuantRecipe(QuantSpec.int_(4, 16), overrides=(LayerOverride("lm_head", QuantSpec.int_(8, 16)),),
                         tied_head="share")
    lowbit.save(lowbit.quantize(lowbit.load(tied_dir), shared), root / "shared")
    lowbit.save(lowbit.quantize_llm_int8(lowbit.load(float_dir)), root / "int8")
    return [float_dir, root / "sharded", root / "mixed", root / "shared", root / "int8"]


CONFIG_KEYS = ("quantization_config", "modules", "default_spec", "activations", "shared_embeddings", "format_version",
               "quant_method", "model_type", "architectures", "hidden_size", "vocab_size", "num_hidden_layers",
               "tie_word_embeddings", "torch_dtype", "dtype", "rope_scaling", "head_dim")


def mutate_model_dir(rng: random.Random, seed: Path, case: Path, keys: tuple[str, ...] = CONFIG_KEYS) -> str:
    """One file of a model directory mutated: config.json (as a document), a safetensors file (header or
    bytes), the shard index; or a file removed, or a pickle file added."""
    files = sorted(p.name for p in seed.iterdir() if p.is_file())
    r = rng.random()
    if r < 0.05:
        victim = rng.choice(files)
        clone_dir(seed, case, {victim: None})
        return f"{seed.name}: rm {victim}"
    if r < 0.07:
        clone_dir(seed, case, {"pytorch_model.bin": b"\x80\x02}q\x00.", "model.safetensors": None})
        return f"{seed.name}: pickle only"
    if r < 0.5:
        target = "config.json"
    else:
        target = rng.choice([f for f in files if f.endswith((".safetensors", ".json")) and f != "config.json"]
                            or ["config.json"])
    return f"{seed.name}/{target}: {mutate_file_of_dir(rng, seed, case, target, keys)}"


def _load_and_run(path: Path, lazy: bool = False) -> Any:
    """``lowbit.load`` (with ``lazy``: blocks left on disk, then read one by one as the calibration runner does)."""
    import lowbit

    model = lowbit.load(path, lazy_blocks=lazy)
    if lazy:
        blocks = model.lowbit_lazy_blocks
        for i in range(model.config.num_hidden_layers):
            blocks.block_nbytes(i)
            blocks.materialize(i)
    _forward(model)
    return model


def test_fuzz_model_dir(model_seeds: list[Path], tmp_path: Path) -> None:
    lazy = [False]

    def make(rng: random.Random, case: Path) -> str:
        lazy[0] = rng.random() < 0.3
        return mutate_model_dir(rng, rng.choice(model_seeds), case) + (" (lazy blocks)" if lazy[0] else "")

    warm = [lambda w, s=s, z=z: _load_and_run(s, z) for s in model_seeds for z in (False, True)]
    report = run_cases(lambda path: _load_and_run(path, lazy[0]), make, CASES, name="model_dir", work=tmp_path,
                       warmup=warm)
    _finish(report)


# ------------------------------------------------------------------------------------------- GPTQ-format directories


@pytest.fixture(scope="module")
def gptq_seeds(model_seeds: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """GPTQ directories lowbit export wrote: v1 int4-g16 asym, v2 int4 sym, v1 int8 per-channel, v2 int3-g32 asym;
    an act-order copy (g_idx permuted, desc_act), a GPTQModel ``dynamic`` copy, an AutoGPTQ quantize_config.json
    copy."""
    from safetensors.torch import load_file, save_file

    import lowbit
    from lowbit import QuantSpec
    from lowbit.io.gptq_format import export_gptq

    root = tmp_path_factory.mktemp("fuzz_gptq")
    mha = _tiny_llama(root / "float-mha", kv_heads=2)  # k_proj/v_proj 32 wide: whole int32 words at 3 bits
    seeds = []
    for name, spec, fmt in [("v1-int4-asym", QuantSpec.int_(4, 16, symmetric=False), "gptq"),
                            ("v2-int4-sym", QuantSpec.int_(4, 16), "gptq_v2"),
                            ("v1-int8-ch", QuantSpec.int_(8, None), "gptq"),
                            ("v2-int3-asym", QuantSpec.int_(3, 32, symmetric=False), "gptq_v2")]:
        source = mha if spec.bits == 3 else model_seeds[0]
        seeds.append(export_gptq(lowbit.quantize(lowbit.load(source), spec), root / name, checkpoint_format=fmt))

    act = root / "act-order"
    clone_dir(seeds[0], act, {})
    tensors = load_file(str(act / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.g_idx"
    tensors[key] = tensors[key][torch.randperm(tensors[key].numel(), generator=torch.Generator().manual_seed(0))]
    (act / "model.safetensors").unlink()
    save_file(tensors, str(act / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(act, lambda q: q.update(desc_act=True))
    seeds.append(act)

    dynamic = root / "dynamic"
    clone_dir(seeds[0], dynamic, {})
    _edit_config(dynamic, lambda q: q.update(dynamic={r"+:.*down_proj": {"bits": 4, "group_size": 16},
                                                      r"-:.*never_matches": {}}))
    seeds.append(dynamic)

    legacy = root / "autogptq"
    clone_dir(seeds[1], legacy, {})
    _edit_config(legacy, lambda q: q.clear())
    seeds.append(legacy)
    return seeds


def _edit_config(path: Path, edit: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    if not config["quantization_config"]:
        del config["quantization_config"]
    (path / "config.json").unlink()  # a hard link to the seed it was cloned from
    (path / "config.json").write_text(json.dumps(config, indent=2))


GPTQ_KEYS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "format", "pack_dtype", "dynamic",
             "quant_method", "lm_head", "modules_in_block_to_quantize", "quantization_config", "model_type")


def test_fuzz_gptq_dir(gptq_seeds: list[Path], tmp_path: Path) -> None:
    import warnings

    def read(path: Path) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # act-order and v1 overflow warnings
            return _load_and_run(path)

    report = run_cases(read, lambda rng, case: mutate_model_dir(rng, rng.choice(gptq_seeds), case, GPTQ_KEYS), CASES,
                       name="gptq_dir", work=tmp_path, warmup=[lambda w, s=s: read(s) for s in gptq_seeds])
    _finish(report)


# ------------------------------------------------------------------------------------------- recipes

HAND_RECIPE = """\
# mixed precision, written by hand: comments, flow maps, an anchor and an alias
method: hqq
options: {iters: 5, lp_norm: 0.7, early_stop: true}
default: &base {format: int, bits: 4, group_size: 16, symmetric: false}
skip: [lm_head, 'model\\.layers\\.0\\.mlp\\..*']
include: null
overrides:
  - pattern: down_proj
    spec: {format: nf4, group_size: 64, double_quant: true}
  - pattern: o_proj
    spec: null
  - pattern: q_proj
    spec: *base
"""
RECIPE_KEYS = ("method", "default", "skip", "include", "overrides", "options", "tied_head", "pattern", "spec",
               "format", "bits", "group_size", "symmetric", "granularity", "double_quant", "scale_dtype", "zero_dtype",
               "damp", "act_order", "iters", "threshold", "alpha", "act_observer", "grid")
LAYER_NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head", "model.embed_tokens")


@pytest.fixture(scope="module")
def recipe_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Recipes ``lowbit plan`` writes (YAML and JSON, every key used) and hand-written ones."""
    from lowbit import LayerOverride, QuantRecipe, QuantSpec
    from lowbit.plan.recipe_out import write_recipe

    root = tmp_path_factory.mktemp("fuzz_recipes")
    full = QuantRecipe(QuantSpec.int_(4, 64, symmetric=False), method="gptq", skip=("lm_head", "embed"),
                       include=("model\\.layers\\..*",),
                       overrides=(LayerOverride("down_proj", QuantSpec.int_(8, None)), LayerOverride("o_proj", None),
                                  LayerOverride("q_proj", QuantSpec.nf4(64, double_quant=True))),
                       options={"damp": 0.01, "act_order": False, "block_size": 64}, tied_head="share")
    w8a8 = QuantRecipe(QuantSpec.int_(8, None), method="static", options={"act_observer": "mse", "alpha": 0.6})
    paths = [write_recipe(full, root / "full.yaml", ["planned by lowbit"]), write_recipe(full, root / "full.json"),
             write_recipe(w8a8, root / "w8a8.yml"), write_recipe(w8a8, root / "w8a8.json")]
    (root / "hand.yaml").write_text(HAND_RECIPE)
    (root / "hand.json").write_text(json.dumps({"default": {"format": "fp8_e4m3"}, "method": "awq",
                                                "options": {"grid": 10, "clip": True}}))
    return paths + [root / "hand.yaml", root / "hand.json"]


def _read_recipe(path: Path) -> Any:
    """``QuantRecipe.load``, the method's typed options, and the spec of a few layer names."""
    from lowbit import QuantRecipe
    from lowbit.algorithms.weight_only import method_config

    recipe = QuantRecipe.load(path)
    method_config(recipe)
    for name in LAYER_NAMES:
        recipe.spec_for(name)
    recipe.to_dict()
    return recipe


def _recipe_case(rng: random.Random, seeds: list[Path], case_dir: Path) -> tuple[Path, str]:
    import yaml

    seed = rng.choice(seeds)
    text = seed.read_text()
    case = case_dir / ("recipe" + seed.suffix)
    if seed.suffix == ".json":
        blob, how = mutate_json_text(rng, json.loads(text), RECIPE_KEYS)
    else:
        blob, how = mutate_yaml_text(rng, yaml.safe_load(text), text, RECIPE_KEYS)
    fresh_dir(case_dir)
    case.write_bytes(blob)
    return case, f"{seed.name}: {how}"


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_fuzz_recipe(kind: str, recipe_seeds: list[Path], tmp_path: Path) -> None:
    seeds = [p for p in recipe_seeds if (p.suffix == ".json") == (kind == "json")]
    chosen: list[Path] = []

    def make(rng: random.Random, case: Path) -> str:
        path, how = _recipe_case(rng, seeds, case)
        chosen[:] = [path]
        return how

    report = run_cases(lambda case: _read_recipe(chosen[0]), make, CASES, name=f"recipe_{kind}", work=tmp_path,
                       warmup=[lambda w, s=s: _read_recipe(s) for s in seeds])
    _finish(report)


# ------------------------------------------------------------------------------------------- calibration data

# Llama 2's chat template in miniature: it insists that user and assistant alternate, as many real ones do
CHAT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                 "{% endif %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The built-in tiny-lm tokenizer, with a chat template."""
    import transformers

    from lowbit.models.resolve import builtin_dir

    tok = transformers.AutoTokenizer.from_pretrained(builtin_dir("tiny-lm"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _paragraphs(n: int) -> list[str]:
    from lowbit.models.resolve import builtin_dir

    text = (builtin_dir("tiny-lm") / "calib.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


@pytest.fixture(scope="module")
def text_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A .txt file, a .jsonl of {"text"} records, a directory of .txt/.md/.rst files (and a file to ignore)."""
    root = tmp_path_factory.mktemp("fuzz_text")
    paras = _paragraphs(12)
    (root / "calib.txt").write_text("\n\n".join(paras[:6]) + "\n", encoding="utf-8")
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras)),
                                      encoding="utf-8")
    d = root / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(paras[0] + "\n", encoding="utf-8")
    (d / "sub" / "b.md").write_text("# notes\n\n" + paras[1] + "\n", encoding="utf-8")
    (d / "c.rst").write_text(paras[2] + "\n", encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\xff" * 16)
    return {"txt": root / "calib.txt", "jsonl": root / "calib.jsonl", "dir": d}


def _file_case(rng: random.Random, seed: Path, case: Path, keys: tuple[str, ...] = ("text",)) -> tuple[Path, str]:
    """``case``/``seed.name`` := a mutated copy of the seed file or directory; returns that path."""
    fresh_dir(case)
    target = case / seed.name
    if seed.is_dir():
        return target, mutate_text_dir(rng, seed, target)
    text = seed.read_text(encoding="utf-8")
    if seed.suffix == ".jsonl":
        blob, how = mutate_jsonl(rng, [json.loads(line) for line in text.splitlines() if line.strip()], keys)
    else:
        blob, how = mutate_text(rng, text)
    target.write_bytes(blob)
    return target, how


def _file_reader_test(name: str, seed: Path, read: Any, work: Path, keys: tuple[str, ...] = ("text",)) -> None:
    chosen: list[Path] = []

    def make(rng: random.Random, case: Path) -> str:
        path, how = _file_case(rng, seed, case, keys)
        chosen[:] = [path]
        return how

    _finish(run_cases(lambda case: read(chosen[0]), make, CASES, name=name, work=work, warmup=[lambda w: read(seed)]))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "dir"])
def test_fuzz_calibration(kind: str, text_seeds: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches

    def read(path: Path) -> torch.Tensor:
        batches = calibration_batches(tokenizer, CalibConfig(source=str(path), samples=2, seq_len=16))
        assert batches.shape == (2, 16) and batches.dtype == torch.long
        return batches

    _file_reader_test(f"calib_{kind}", text_seeds[kind], read, tmp_path)


def test_fuzz_calibration_dataset(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A ``datasets`` directory (save_to_disk): its JSON files mutated as documents, its Arrow file as bytes."""
    datasets = pytest.importorskip("datasets")
    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches

    seed = tmp_path_factory.mktemp("fuzz_dataset") / "ds"
    datasets.Dataset.from_dict({"text": _paragraphs(8), "n": list(range(8))}).save_to_disk(str(seed))

    def read(path: Path) -> torch.Tensor:
        return calibration_batches(tokenizer, CalibConfig(source=str(path), samples=2, seq_len=16))

    def make(rng: random.Random, case: Path) -> str:
        files = sorted(p.name for p in seed.iterdir() if p.is_file())
        target = rng.choice(files)
        blob = (seed / target).read_bytes()
        if target.endswith(".json"):
            blob, how = mutate_json_text(rng, json.loads(blob), ("features", "_data_files", "filename", "dtype",
                                                                "_type", "splits", "num_rows"))
        else:
            blob, how = mutate_bytes(rng, blob, hot=min(len(blob), 2048))
        clone_dir(seed, case, {target: blob})
        return f"{target}: {how}"

    _finish(run_cases(read, make, CASES, name="calib_dataset", work=tmp_path, warmup=[lambda w: read(seed)]))


# ------------------------------------------------------------------------------------------- training data


@pytest.fixture(scope="module")
def train_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """JSONL of text / prompt+response / chat records (and all three mixed), classification JSONL (int, str labels)."""
    root = tmp_path_factory.mktemp("fuzz_train")
    paras = _paragraphs(8)
    text = [{"text": p} for p in paras[:4]]
    pairs = [{"prompt": f"Summarise: {p[:80]}", "response": p[80:200]} for p in paras[:4]]
    chats = [{"messages": [{"role": "user", "content": p[:60]}, {"role": "assistant", "content": p[60:160]},
                           {"role": "user", "content": "and then?"}, {"role": "assistant", "content": p[160:220]}]}
             for p in paras[:3]]
    classes_int = [{"text": p[:100], "label": i % 3} for i, p in enumerate(paras)]
    classes_str = [{"text": p[:100], "label": ["neg", "pos"][i % 2]} for i, p in enumerate(paras)]
    out = {}
    mixed = text[:2] + pairs[:2] + chats[:2]
    for name, records in [("text", text), ("pairs", pairs), ("chat", chats), ("mixed", mixed),
                          ("classes_int", classes_int), ("classes_str", classes_str)]:
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


TRAIN_KEYS = ("text", "prompt", "response", "messages", "role", "content", "label")


@pytest.mark.parametrize("kind", ["txt", "dir"])
def test_fuzz_train_text(kind: str, text_seeds: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    from lowbit.train.data import load_causal_lm_data

    _file_reader_test(f"train_{kind}", text_seeds[kind], lambda p: load_causal_lm_data(p, tokenizer, 16), tmp_path)


def test_fuzz_train_jsonl(train_seeds: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    import warnings

    from lowbit.train.data import load_causal_lm_data

    seeds = [train_seeds[k] for k in ("text", "pairs", "chat", "mixed")]
    chosen: list[Path] = []

    def read(path: Path) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "examples without loss tokens"
            data = load_causal_lm_data(path, tokenizer, 32)
        assert data.tensors["input_ids"].shape[1] == 32
        return data

    def make(rng: random.Random, case: Path) -> str:
        seed = rng.choice(seeds)
        path, how = _file_case(rng, seed, case, TRAIN_KEYS)
        chosen[:] = [path]
        return f"{seed.name}: {how}"

    _finish(run_cases(lambda case: read(chosen[0]), make, CASES, name="train_jsonl", work=tmp_path,
                      warmup=[lambda w, s=s: read(s) for s in seeds]))


def test_fuzz_train_classification(train_seeds: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    from lowbit.train.data import load_classification_data

    seeds = [train_seeds["classes_int"], train_seeds["classes_str"]]
    chosen: list[Path] = []

    def read(path: Path) -> Any:
        data, names = load_classification_data(path, tokenizer, 16)
        assert len(names) >= 1 and data.tensors["labels"].max() < len(names)
        return data

    def make(rng: random.Random, case: Path) -> str:
        seed = rng.choice(seeds)
        path, how = _file_case(rng, seed, case, TRAIN_KEYS)
        chosen[:] = [path]
        return f"{seed.name}: {how}"

    _finish(run_cases(lambda case: read(chosen[0]), make, CASES, name="train_classes", work=tmp_path,
                      warmup=[lambda w, s=s: read(s) for s in seeds]))


# ------------------------------------------------------------------------------------------- adapter directories

ADAPTER_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "modules_to_save", "bias", "use_dora",
                "rank_pattern", "alpha_pattern", "init_lora_weights", "num_virtual_tokens", "token_dim",
                "num_layers", "num_attention_heads", "prompt_tuning_init", "feedforward_modules", "init_r", "target_r",
                "total_step", "reduction_factor", "placement", "base", "quantize", "loftq", "inference_mode")


@pytest.fixture(scope="module")
def adapter_seeds(model_seeds: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Adapter directories over the tiny float Llama: lowbit's (a QLoRA ``finetune`` run with its
    lowbit_finetune.json; save_adapter of DoRA + modules_to_save + bias, IA3, prompt and prefix tuning,
    bottleneck, AdaLoRA) and Hugging Face peft's (LoRA, DoRA, IA3, prompt tuning, prefix tuning, AdaLoRA)."""
    import lowbit
    from lowbit.peft import (
        AdaLoraConfig,
        BottleneckConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        apply_adapter,
        finetune,
        save_adapter,
    )
    from lowbit.peft.finetune import quantize_base
    from lowbit.train import TrainConfig
    from lowbit.train.data import TokenDataset

    root = tmp_path_factory.mktemp("fuzz_adapters")
    base_dir = model_seeds[0]
    ours = []
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (4, 8))
    data = TokenDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    spec = {"format": "int", "bits": 4, "group_size": 16}
    model = quantize_base(lowbit.load(base_dir), spec)
    finetune(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), data,
             TrainConfig(steps=1, batch_size=2, show_progress=False, plot=False, log_every=1), root / "qlora",
             base={"model": str(base_dir), "quantize": spec})
    ours.append(root / "qlora")
    for name, config in [
        ("dora", LoraConfig(r=4, use_dora=True, target_modules="all-linear", modules_to_save=["lm_head"],
                            bias="lora_only", init_lora_weights=False)),
        ("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
        ("prompt", PromptTuningConfig(num_virtual_tokens=3)),
        ("prefix", PrefixTuningConfig(num_virtual_tokens=2)),
        ("bottleneck", BottleneckConfig(reduction_factor=8)),
        ("adalora", AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "up_proj"])),
    ]:
        model = lowbit.load(base_dir)
        apply_adapter(model, config)
        ours.append(save_adapter(model, root / name))

    import peft
    import transformers

    theirs = []
    for name, config in [
        ("peft-lora", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")),
        ("peft-dora", peft.LoraConfig(r=2, use_dora=True, target_modules=["v_proj", "down_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False)),
        ("peft-ia3", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                    task_type="CAUSAL_LM")),
        ("peft-prompt", peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
        ("peft-prefix", peft.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")),
        ("peft-adalora", peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"],
                                            task_type="CAUSAL_LM")),
    ]:
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        peft.get_peft_model(hf, config).save_pretrained(root / name)
        theirs.append(root / name)
    return {"lowbit": ours, "peft": theirs}


def mutate_adapter_dir(rng: random.Random, seed: Path, case: Path) -> str:
    """One file of an adapter directory mutated (adapter_config.json, lowbit_finetune.json as documents; the
    safetensors file), a file removed, or a pickle adapter_model.bin in place of the safetensors."""
    files = sorted(p.name for p in seed.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    r = rng.random()
    if r < 0.05:
        victim = rng.choice(files)
        clone_dir(seed, case, {victim: None})
        return f"{seed.name}: rm {victim}"
    if r < 0.07:
        clone_dir(seed, case, {"adapter_model.bin": b"\x80\x02}q\x00.", "adapter_model.safetensors": None})
        return f"{seed.name}: pickle only"
    target = "adapter_config.json" if r < 0.5 else rng.choice(files)
    return f"{seed.name}/{target}: {mutate_file_of_dir(rng, seed, case, target, ADAPTER_KEYS)}"


def test_fuzz_adapter_lowbit(adapter_seeds: dict[str, list[Path]], model_seeds: list[Path], tmp_path: Path) -> None:
    """``load_with_adapter`` (what ``lowbit eval/merge --adapter`` run): the run file, the base quantized as the
    run did, the peft files."""
    from lowbit.peft import load_with_adapter

    def read(path: Path) -> Any:
        model = load_with_adapter(model_seeds[0], path)
        _forward(model)
        return model

    seeds = adapter_seeds["lowbit"]
    _finish(run_cases(read, lambda rng, case: mutate_adapter_dir(rng, rng.choice(seeds), case), CASES,
                      name="adapter_lowbit", work=tmp_path, warmup=[lambda w, s=s: read(s) for s in seeds]))


def test_fuzz_adapter_peft(adapter_seeds: dict[str, list[Path]], model_seeds: list[Path], tmp_path: Path) -> None:
    """``load_adapter`` over a base model (a fresh copy of one loaded model per case)."""
    import lowbit
    from lowbit.peft import load_adapter

    base = lowbit.load(model_seeds[0])

    def read(path: Path) -> Any:
        model = load_adapter(copy.deepcopy(base), path)
        _forward(model)
        return model

    seeds = adapter_seeds["peft"]
    _finish(run_cases(read, lambda rng, case: mutate_adapter_dir(rng, rng.choice(seeds), case), CASES,
                      name="adapter_peft", work=tmp_path, warmup=[lambda w, s=s: read(s) for s in seeds]))
