"""Coverage-guided fuzzing of lowbit's readers with atheris (libFuzzer for Python): the complement of the seeded
mutational harness (fuzz_support.py), which ``make fuzz`` runs too.

    python tests/atheris_driver.py READER WORK_DIR [libFuzzer flags, e.g. -runs=10000 -timeout=1]

READER is one of ``config`` (a model directory's config.json), ``safetensors`` (a quantized model's
model.safetensors), ``recipe`` (a recipe YAML) and ``train_jsonl`` (fine-tuning records). WORK_DIR receives the
seed files (written by lowbit's and transformers' own writers) and the corpus. lowbit is instrumented for coverage;
each input goes through the reader (and a forward pass where it loads a model) within 1 s and 100 MB of extra
memory; a LowbitError is a clean rejection, anything else — another exception, a bound exceeded — is a crash:
libFuzzer stops, prints the traceback and saves the input as crash-<sha1>. Mutations alternate between
libFuzzer's byte-level ones and the structure-aware ones of fuzz_support (JSON/YAML documents, safetensors
headers, JSONL records).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (not instrumented: only lowbit is)
import transformers  # noqa: E402
import yaml  # noqa: E402

with atheris.instrument_imports(include=["lowbit"]):
    import lowbit  # noqa: E402
    import lowbit.algorithms.weight_only  # noqa: E402,F401
    import lowbit.io.checkpoint  # noqa: E402,F401
    import lowbit.models.config_check  # noqa: E402,F401
    import lowbit.recipe  # noqa: E402,F401
    import lowbit.train.data  # noqa: E402,F401
    from lowbit.errors import LowbitError  # noqa: E402

from fuzz_support import bounded, mutate_json_text, mutate_jsonl, mutate_safetensors, mutate_yaml_text  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4]])
RECIPE = """\
method: gptq
default: {format: int, bits: 4, group_size: 16, symmetric: false}
skip: [lm_head]
overrides:
  - pattern: "mlp.down_proj"
    spec: {format: nf4, group_size: 16, double_quant: true}
  - pattern: "self_attn.o_proj"
    spec: {format: int, bits: 8, granularity: channel}
options: {damp: 0.01, act_order: true}
"""
TRAIN = [{"text": "the quick brown fox jumps over the lazy dog"},
         {"prompt": "Translate to French: cat", "response": "chat"},
         {"prompt": "2 + 2 =", "response": " 4"}]
KEYS = ("quantization_config", "modules", "default_spec", "hidden_size", "num_hidden_layers", "vocab_size",
        "bits", "group_size", "format", "method", "skip", "overrides", "options", "text", "prompt", "response")


def make_seeds(work: Path) -> None:
    """The float tiny Llama, its int4-g16 quantization, a recipe and training records (once per WORK_DIR)."""
    if (work / "done").exists():
        return
    from lowbit.formats.spec import QuantSpec
    from lowbit.recipe import QuantRecipe

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "float")
    lowbit.save(lowbit.quantize(lowbit.load(work / "float"), QuantRecipe(QuantSpec.int_(4, 16, symmetric=False))),
                work / "int4")
    (work / "recipe.yaml").write_text(RECIPE)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (work / "done").write_text("")


def _model_dir(work: Path, seed: str, name: str) -> Callable[[bytes], Path]:
    """Write an input as file ``name`` of a copy of model directory ``seed`` (its other files hard-linked)."""
    from fuzz_support import clone_dir

    def write(data: bytes) -> Path:
        clone_dir(work / seed, work / "case", {name: data})
        return work / "case"
    return write


def _file(work: Path, name: str) -> Callable[[bytes], Path]:
    def write(data: bytes) -> Path:
        (work / name).write_bytes(data)
        return work / name
    return write


def _load_and_run(path: Path) -> None:
    model = lowbit.load(path)
    with torch.no_grad():
        model(input_ids=IDS)


def _read_recipe(path: Path) -> None:
    recipe = lowbit.recipe.QuantRecipe.load(path)
    lowbit.algorithms.weight_only.method_config(recipe)
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"):
        recipe.spec_for(layer)


def _plain_yaml(data: bytes) -> Any:
    """A YAML document to mutate structurally; one with anchors/aliases (an earlier mutation's alias bomb, which
    would blow up here, in the mutator, not in the reader) is mutated as bytes instead."""
    if b"&" in data or b"*" in data:
        raise ValueError("anchors: mutate the bytes")
    return yaml.safe_load(data)


def reader(name: str, work: Path) -> tuple[Callable[[bytes], Path], Callable[[Path], Any], Path,
                                           Callable[[random.Random, bytes], bytes]]:
    """(write an input, read it, the seed file, a structure-aware mutation) of reader ``name``."""
    if name == "config":
        return (_model_dir(work, "float", "config.json"), _load_and_run, work / "float" / "config.json",
                lambda rng, data: mutate_json_text(rng, json.loads(data), KEYS)[0])
    if name == "safetensors":
        return (_model_dir(work, "int4", "model.safetensors"), _load_and_run, work / "int4" / "model.safetensors",
                lambda rng, data: mutate_safetensors(rng, data)[0])
    if name == "recipe":
        return (_file(work, "case.yaml"), _read_recipe, work / "recipe.yaml",
                lambda rng, data: mutate_yaml_text(rng, _plain_yaml(data), data.decode(), KEYS)[0])
    if name == "train_jsonl":
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(lowbit.models.resolve.builtin_dir("tiny-lm")))
        return (_file(work, "case.jsonl"), lambda p: lowbit.train.data.load_causal_lm_data(p, tokenizer, 16),
                work / "train.jsonl",
                lambda rng, data: mutate_jsonl(rng, [json.loads(x) for x in data.splitlines()], KEYS)[0])
    raise SystemExit(f"unknown reader {name!r}; one of config, safetensors, recipe, train_jsonl")


def main() -> None:
    name, work = sys.argv[1], Path(sys.argv[2]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    make_seeds(work)
    write, read, seed, structured = reader(name, work)
    corpus = work / f"corpus-{name}"
    corpus.mkdir(exist_ok=True)
    (corpus / "seed").write_bytes(seed.read_bytes())

    def one_input(data: bytes) -> None:
        path = write(data)
        with bounded():
            try:
                read(path)
            except LowbitError:
                pass

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            try:
                return structured(rng, data)[:max_size]
            except Exception:  # noqa: BLE001 - the input is no longer a document: mutate its bytes instead
                pass
        return atheris.Mutate(data, max_size)

    read(write(seed.read_bytes()))  # warm-up outside the bounds: lazy imports, kernel caches
    argv = [sys.argv[0], *sys.argv[3:], f"-max_len={2 * seed.stat().st_size + 4096}", f"-artifact_prefix={work}/",
            str(corpus)]
    atheris.Setup(argv, one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
