"""Fuzz the readers of resume state (issue 21): what ``--resume`` reads back after a kill.

* ``train_checkpoint``: the trainer's ``OUT/checkpoint/`` (trainable, optimizer, RNG and callback tensors in
  safetensors, ``state.json``) — resumed by ``Trainer.train`` (finetune, distill, qat --e2e-steps). Seeds: runs
  with AdamW, with 8-bit AdamW (quantized optimizer state), and an AdaLoRA finetune (callback state).
* ``block_checkpoint``: a GPTQ/AWQ run's ``.OUT.resume/`` (``state.json`` naming each finished block's quantized
  layers, ``block-<i>.safetensors``) — restored block by block by the layer-by-layer runner.

Each case mutates one file of a seed (JSON as a document, safetensors header or bytes), removes one, or renames
the checkpoint; reading it must end in a resumed run, a fresh start, or a typed lowbit error, within the fuzz
bounds (``fuzz_support``). ``LOWBIT_FUZZ_CASES`` per reader (500 in the default suite, ``make fuzz`` 10,000).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fuzz_support import clone_dir, mutate_file_of_dir, n_cases, run_cases
from lowbit.errors import CorruptFileError
from test_fuzz_readers import _finish
from test_fuzz_regressions import Fixed

CASES = n_cases(500)

STATE_KEYS = ("step", "position", "tokens", "elapsed", "loss", "eval_loss", "config", "optimizer",
              "optimizer_scalars", "python_random", "numpy_random", "callbacks", "format_version")
BLOCK_KEYS = ("format", "fingerprint", "blocks", "layers", "spec", "shape", "keys", "bits", "group_size", "format")


def mutate_run_dir(rng: random.Random, seed: Path, case: Path, sub: str, keys: tuple[str, ...]) -> str:
    """One file under ``seed/sub`` mutated, removed, or the whole ``sub`` renamed (as a crash leaves it)."""
    files = sorted(p.relative_to(seed).as_posix() for p in (seed / sub).rglob("*") if p.is_file())
    r = rng.random()
    if r < 0.05:
        victim = rng.choice(files)
        clone_dir(seed, case, {victim: None})
        return f"rm {victim}"
    if r < 0.08 and sub == "checkpoint":
        clone_dir(seed, case, {})
        (case / sub).rename(case / ".checkpoint.old")
        return "checkpoint/ → .checkpoint.old/"
    target = f"{sub}/state.json" if r < 0.5 else rng.choice(files)
    return f"{target}: {mutate_file_of_dir(rng, seed, case, target, keys)}"


# ------------------------------------------------------------------------------------------- training checkpoints


@pytest.fixture(scope="module")
def train_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Callable[[Path], Any]]]:
    """(run directory holding checkpoint/, resume(case dir)) for each seed run."""
    from test_train_support import make_model, reference_config, text_data, tiny_llama

    from lowbit.peft import AdaLoraConfig, finetune
    from lowbit.train import Trainer

    root = tmp_path_factory.mktemp("fuzz_train_ckpt")
    train, _ = text_data()
    seeds: list[tuple[Path, Callable[[Path], Any]]] = []
    for optimizer in ("adamw", "adamw8bit"):
        def resume(out: Path, optimizer: str = optimizer, steps: int = 3) -> Any:
            config = reference_config(steps=steps, batch_size=2, checkpoint_every=1, out_dir=out, resume=True,
                                      optimizer=optimizer)
            return Trainer(make_model("mini"), config, train).train()
        resume(root / optimizer, steps=2)
        seeds.append((root / optimizer, resume))

    def resume_adalora(out: Path, steps: int = 3) -> Any:
        config = reference_config(steps=steps, batch_size=2, checkpoint_every=1, out_dir=out, resume=True)
        model = tiny_llama(trainable=())
        adapter = AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1, deltaT=1,
                                target_modules=["q_proj", "v_proj"])
        return finetune(model, adapter, train, config, out, overwrite=True)
    resume_adalora(root / "adalora", steps=2)
    seeds.append((root / "adalora", resume_adalora))
    for run, _ in seeds:
        assert (run / "checkpoint" / "state.json").is_file(), run
    return seeds


def test_fuzz_train_checkpoint(train_seeds: list[tuple[Path, Callable[[Path], Any]]], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.train.trainer

    # the trainer's gc.collect before it measures peak memory: 0.3 s a case in this process, and no part of reading
    monkeypatch.setattr(lowbit.train.trainer, "release_memory", lambda: None)
    chosen: dict[str, Callable[[Path], Any]] = {}

    def make(rng: random.Random, case: Path) -> str:
        seed, resume = rng.choice(train_seeds)
        chosen["resume"] = resume
        return f"{seed.name}: " + mutate_run_dir(rng, seed, case, "checkpoint", STATE_KEYS)

    _finish(run_cases(lambda path: chosen["resume"](path), make, CASES, name="train_checkpoint", work=tmp_path,
                      warmup=[lambda w, s=s, r=r: (clone_dir(s, w / "warm", {}), r(w / "warm"))
                              for s, r in train_seeds]), FIXED)


# ------------------------------------------------------------------------------------------- block checkpoints


@pytest.fixture(scope="module")
def block_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Any, str]]:
    """(directory holding ``resume/``, the float model the blocks come from, fingerprint): the tiny Llama's two
    blocks saved after quantizing them int4 g16 (asym), nf4 + int8 per channel (mixed), and with AWQ-style
    scales folded into the norms (a float parameter outside the quantized layers changed)."""
    from test_train_support import tiny_llama

    import lowbit
    from lowbit.algorithms.block_checkpoint import BlockCheckpoint, run_fingerprint
    from lowbit.formats.spec import QuantSpec
    from lowbit.recipe import LayerOverride, QuantRecipe

    root = tmp_path_factory.mktemp("fuzz_block_ckpt")
    base = tiny_llama(trainable=())
    seeds = []
    recipes = {
        "int4": QuantRecipe(QuantSpec.int_(4, 16, symmetric=False)),
        "mixed": QuantRecipe(QuantSpec.nf4(16, double_quant=True),
                             overrides=(LayerOverride("down_proj", QuantSpec.int_(8, None)),)),
        "folded": QuantRecipe(QuantSpec.int_(3, 16)),
    }
    for name, recipe in recipes.items():
        model = lowbit.quantize(copy.deepcopy(base), recipe)
        if name == "folded":
            with torch.no_grad():
                for block in model.model.layers:
                    block.post_attention_layernorm.weight.mul_(1.5)
        fingerprint = run_fingerprint(name)
        ckpt = BlockCheckpoint(root / name / "resume", fingerprint)
        for i, block in enumerate(model.model.layers):
            ckpt.save(block, i)
        seeds.append((root / name, base, fingerprint))
    return seeds


def _restore_blocks(path: Path, base: Any, fingerprint: str) -> int:
    """What the layer-by-layer runner does on resume: each finished block put back into the float model's block,
    which must then run."""
    from lowbit.algorithms.block_checkpoint import BlockCheckpoint

    ckpt = BlockCheckpoint(path / "resume", fingerprint)
    for i, layer in enumerate(base.model.layers):
        if ckpt.done(i):
            block = copy.deepcopy(layer)
            for module in ckpt.restore(block, i).values():  # a restored layer must compute (its kernel reads the codes)
                with torch.no_grad():
                    module(torch.randn(1, 5, module.in_features, generator=torch.Generator().manual_seed(i)))
    return len(ckpt.finished)


def test_fuzz_block_checkpoint(block_seeds: list[tuple[Path, Any, str]], tmp_path: Path) -> None:
    chosen: dict[str, tuple[Any, str]] = {}

    def make(rng: random.Random, case: Path) -> str:
        seed, base, fingerprint = rng.choice(block_seeds)
        chosen["run"] = (base, fingerprint)
        return f"{seed.name}: " + mutate_run_dir(rng, seed, case, "resume", BLOCK_KEYS)

    _finish(run_cases(lambda path: _restore_blocks(path, *chosen["run"]), make, CASES, name="block_checkpoint",
                      work=tmp_path, warmup=[lambda w, s=s: _restore_blocks(s[0], s[1], s[2]) for s in block_seeds]),
            FIXED)


# ------------------------------------------------------------------------------------------- regression tests
# Each distinct failure these fuzzers found, fixed in the reader (train/checkpoint.py, peft/adalora.py,
# algorithms/block_checkpoint.py): its minimal input now ends in the typed error.


def _state_edit(seed: int, edit: Callable[[dict], Any] | None = None, raw: bytes | None = None, file: str = "state.json",
                tensors: Callable[[dict], Any] | None = None) -> Callable[..., Any]:
    """Resume train seed ``seed`` from a copy whose checkpoint/``file`` had ``edit`` (JSON) / ``tensors``
    (safetensors) applied, or holds ``raw`` bytes."""
    def run(seeds: dict[str, Any], tmp: Path) -> Any:
        from safetensors.torch import load_file, save_file

        run_dir, resume = seeds["train"][seed]
        case = tmp / "case"
        clone_dir(run_dir, case, {})
        target = case / "checkpoint" / file
        data = target.read_bytes()
        target.unlink()  # hard-linked to the seed: write a new file
        if raw is not None:
            target.write_bytes(raw)
        elif tensors is not None:
            tmp_file = tmp / "t.safetensors"
            tmp_file.write_bytes(data)
            loaded = load_file(str(tmp_file))
            tensors(loaded)
            save_file(loaded, str(target))
        else:
            doc = json.loads(data)
            edit(doc)
            target.write_text(json.dumps(doc))
        import lowbit.train.trainer

        saved, lowbit.train.trainer.release_memory = lowbit.train.trainer.release_memory, lambda: None
        try:
            return resume(case)
        finally:
            lowbit.train.trainer.release_memory = saved
    return run


def _block_edit(seed: int, edit: Callable[[dict], Any] | None = None, raw: bytes | None = None) -> Callable[..., Any]:
    """Restore block seed ``seed`` from a copy whose resume/state.json had ``edit`` applied (or holds ``raw``)."""
    def run(seeds: dict[str, Any], tmp: Path) -> Any:
        path, base, fingerprint = seeds["block"][seed]
        case = tmp / "case"
        clone_dir(path, case, {})
        target = case / "resume" / "state.json"
        doc = json.loads(target.read_bytes())
        target.unlink()
        if raw is not None:
            target.write_bytes(raw)
        else:
            edit(doc)
            target.write_text(json.dumps(doc))
        return _restore_blocks(case, base, fingerprint)
    return run


def _layer(block: int, name: str) -> Callable[[dict], dict]:
    return lambda doc: doc["blocks"][str(block)]["layers"][name]


def _rename_step(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("::step"))
    tensors[key[:-4] + "stop"] = tensors.pop(key)


FIXED: list[Fixed] = [
    # ---- training checkpoints (Trainer.train with resume)
    Fixed("train_checkpoint", "state.json: python_random with an entry removed / a float / -1 in its 625 words",
          "ValueError / TypeError / OverflowError (random.setstate)", CorruptFileError, "python_random",
          _state_edit(0, lambda d: d["python_random"][1].__setitem__(7, 0.5))),
    Fixed("train_checkpoint", "state.json: bytes that are not UTF-8", "UnicodeDecodeError", CorruptFileError,
          "cannot read checkpoint state", _state_edit(1, raw=b'{"step": "\xe6"}')),
    Fixed("train_checkpoint", "state.json: a value nested 100,000 objects deep", "RecursionError", CorruptFileError,
          "cannot read checkpoint state", _state_edit(0, raw=b'{"a":' * 100000 + b"1" + b"}" * 100000)),
    Fixed("train_checkpoint", "state.json: numpy_random cut to one entry", "ValueError (unpacking)", CorruptFileError,
          "numpy_random", _state_edit(0, lambda d: d.__setitem__("numpy_random", d["numpy_random"][:1])
                                      if "numpy_random" in d else d.__setitem__("python_random", [3, [], None]))),
    Fixed("train_checkpoint", "optimizer.safetensors: a parameter's 'step' renamed (a flipped header byte)",
          "KeyError: 'step' (in the optimizer's step)", CorruptFileError, "optimizer state",
          _state_edit(0, file="optimizer.safetensors", tensors=_rename_step)),
    Fixed("train_checkpoint", "optimizer.safetensors: 8-bit AdamW codes cut to half their length",
          "RuntimeError (view) in the optimizer's step", CorruptFileError, "optimizer state",
          _state_edit(1, file="optimizer.safetensors", tensors=lambda t: [t.__setitem__(k, v[: v.numel() // 2])
                                                                          for k, v in list(t.items())
                                                                          if k.endswith("exp_avg_q")])),
    Fixed("train_checkpoint", "state.json: the AdaLoRA scheduler's rank_pattern of the wrong length", "IndexError "
          "later in the schedule", CorruptFileError, "callback 0",
          _state_edit(2, lambda d: [d["callbacks"].__setitem__(k, [True]) for k in list(d["callbacks"])
                                    if "rank_pattern" in k and k.count("::") == 2])),
    Fixed("train_checkpoint", "state.json: step a string", "TypeError (range)", CorruptFileError, "step must be",
          _state_edit(0, lambda d: d.__setitem__("step", "2"))),
    Fixed("train_checkpoint", "state.json: eval_loss removed (found at 10,000 cases)", "KeyError (the trainer's "
          "resume)", CorruptFileError, "has no 'eval_loss'", _state_edit(1, lambda d: d.pop("eval_loss"))),
    # ---- GPTQ/AWQ block checkpoints (BlockCheckpoint.restore)
    Fixed("block_checkpoint", "state.json: a layer's spec without group_size / bits (the tensors no longer fit)",
          "KeyError 'scale' / ValueError (packed rows) in the kernel", CorruptFileError, "does not fit|expected",
          _block_edit(0, lambda d: _layer(0, "mlp.down_proj")(d)["spec"].pop("group_size"))),
    Fixed("block_checkpoint", "state.json: a layer's entry a string", "TypeError (string indices)", CorruptFileError,
          "spec is not a quantization spec", _block_edit(1, lambda d: d["blocks"]["0"]["layers"].__setitem__(
              "self_attn.k_proj", "lowbit"))),
    Fixed("block_checkpoint", "state.json: a layer's tensor list shortened", "AttributeError (no qdata)",
          CorruptFileError, "tensor list", _block_edit(1, lambda d: _layer(1, "self_attn.o_proj")(d)["keys"].pop())),
    Fixed("block_checkpoint", "state.json: a layer's shape changed (65 rows)", "RuntimeError (reshape)",
          CorruptFileError, "does not fit", _block_edit(0, lambda d: _layer(0, "self_attn.q_proj")(d)["shape"]
                                                        .__setitem__(0, 65))),
    Fixed("block_checkpoint", "state.json: a list inside a layer's tensor list", "TypeError (unhashable)",
          CorruptFileError, "does not fit", _block_edit(0, lambda d: _layer(1, "mlp.up_proj")(d).__setitem__(
              "keys", [["scale", "zero", "qdata"]]))),
    Fixed("block_checkpoint", "state.json: nested 100,000 objects deep", "RecursionError", None, "",
          _block_edit(0, raw=b'{"a":' * 100000 + b"1" + b"}" * 100000)),
]


@pytest.fixture(scope="module")
def seeds(train_seeds: Any, block_seeds: Any) -> dict[str, Any]:
    return {"train": train_seeds, "block": block_seeds}


@pytest.mark.parametrize("fixed", FIXED, ids=lambda f: f"{f.reader}: {f.what}")
def test_fixed_failure(fixed: Fixed, seeds: dict[str, Any], tmp_path: Path) -> None:
    """A failure the fuzzer found stays fixed (``error`` None: the checkpoint is set aside and the run starts over)."""
    if fixed.error is None:
        assert fixed.run(seeds, tmp_path) == 0  # nothing restored: the damaged state is removed, the run starts over
        assert not (tmp_path / "case" / "resume").exists()
    else:
        with pytest.raises(fixed.error, match=fixed.match):
            fixed.run(seeds, tmp_path)
