"""Shared by the prompt- and prefix-tuning tests: a padded batch and a (peft, lowbit) model pair."""

from __future__ import annotations

import torch

import lowbit


def batch(seed: int = 0, pad: bool = True) -> dict[str, torch.Tensor]:
    """Two rows of 6 random tokens; the second left-padded by 2 (``pad``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4096, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    if pad:
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pair(path, peft_config, config, seed: int = 1, loader=lowbit.load):
    """(peft model, lowbit model) built from the same seed, so their initial prompts agree."""
    import peft

    from lowbit.peft import apply_adapter

    torch.manual_seed(seed)
    reference = peft.get_peft_model(loader(path), peft_config).eval()
    torch.manual_seed(seed)
    model = apply_adapter(loader(path), config).eval()
    return reference, model


def assert_files_both_ways(model, ref, path, tmp_path, inputs) -> None:
    """lowbit's saved adapter runs in peft, and peft's saved adapter runs in lowbit, with equal logits."""
    import peft

    from lowbit.peft import load_adapter

    loaded = peft.PeftModel.from_pretrained(lowbit.load(path), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_adapter(lowbit.load(path).eval(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())
