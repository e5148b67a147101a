"""LightX2V's step-distillation LoRAs (Wan2.1-T2V-14B-StepDistill-CfgDistill, Kijai's extractions
of them) merged by convert/lora.py vs the same file loaded by diffusers into the torch model.

The layout, from the files' key lists (kijai/ComfyUI-WanVideoWrapper issue 807 and 909, diffusers
PR 12040) and LightX2V's loader (lightx2v/utils/lora_loader.py): original Wan2.1 module names
under `diffusion_model.`; `lora_down.weight` / `lora_up.weight` on every Linear of the blocks and
on head.head, text_embedding.0/2, time_embedding.0/2, time_projection.1; no `.alpha` (scale 1),
or `.alpha` on the blocks' Linears (the Wan2.2 Lightning files); `.diff_b` on every one of those
biases; `.diff` on the RMSNorms and norm3 (+ norm3 `.diff_b`); `blocks.N.diff_m`, the block's
modulation table. diffusers drops the norm and modulation deltas, so the oracle adds those to its
torch weights by hand (the definition: W += strength * delta).
"""

import re

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert import CheckpointError
from convert.lora import lora_updates, merge_loras
from tests.wan_testing import TO_ORIGINAL, inputs, ours_kwargs, relative_error, save_and_convert, tiny_diffusers
from tests.wan_testing import torch_forward

RANK = 4
LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]  # fmt: skip
TOP_LINEARS = ["head.head", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1"]  # fmt: skip
NORMS = ["self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3"]


def _diffusers_names(model) -> dict[str, str]:
    """{original Wan2.1 tensor name: diffusers tensor name}, by the tests' own name table."""
    names = {}
    for name in model.state_dict():
        original = name
        for pattern, replacement in TO_ORIGINAL:
            original = re.sub(pattern, replacement, original)
        names[original] = name
    return names


def lightx2v_file(path, model, *, with_alpha: bool, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Writes a LoRA in LightX2V's layout for `model` (a diffusers WanTransformer3DModel); returns
    (the tensors, {original parameter name: the full delta it adds at strength 1})."""
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    shapes = {original: tuple(state[name].shape) for original, name in _diffusers_names(model).items()}
    tensors, deltas = {}, {}
    blocks = [f"blocks.{i}." for i in range(len(model.blocks))]
    for module in [b + m for b in blocks for m in LINEARS] + TOP_LINEARS:
        out_dim, in_dim = shapes[f"{module}.weight"]
        down = rng.normal(size=(RANK, in_dim)).astype(np.float32) * 0.2
        up = rng.normal(size=(out_dim, RANK)).astype(np.float32) * 0.2
        scale = 1.0
        if with_alpha and module.startswith("blocks."):
            alpha = float(rng.integers(1, 9))
            tensors[f"diffusion_model.{module}.alpha"] = np.array(alpha, np.float32)
            scale = alpha / RANK
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.diff_b"] = rng.normal(size=out_dim).astype(np.float32) * 0.05
        deltas[f"{module}.weight"] = scale * up @ down
        deltas[f"{module}.bias"] = tensors[f"diffusion_model.{module}.diff_b"]
    for module in [b + m for b in blocks for m in NORMS]:
        for leaf, suffix in (("weight", "diff"), ("bias", "diff_b")):
            if f"{module}.{leaf}" in shapes:  # RMSNorms have no bias
                delta = rng.normal(size=shapes[f"{module}.{leaf}"]).astype(np.float32) * 0.05
                tensors[f"diffusion_model.{module}.{suffix}"] = deltas[f"{module}.{leaf}"] = delta
    for block in [b[:-1] for b in blocks] + ["head"]:
        delta = rng.normal(size=shapes[f"{block}.modulation"]).astype(np.float32) * 0.05
        tensors[f"diffusion_model.{block}.diff_m"] = deltas[f"{block}.modulation"] = delta
    save_file(tensors, str(path))
    return tensors, deltas


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightx2v")
    torch_model = tiny_diffusers("t2v", seed=3)
    return torch_model, root


@nnx.jit
def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_lightx2v_lora_merges_like_diffusers_loads_it(base, tmp_path, with_alpha):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    torch_model, _ = base
    path = tmp_path / "lightx2v.safetensors"
    _, deltas = lightx2v_file(path, torch_model, with_alpha=with_alpha)

    loaded = tiny_diffusers("t2v", seed=3)
    state = WanLoraLoaderMixin.lora_state_dict(str(path))  # converts the diffusion_model. layout
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=loaded)
    names, params = _diffusers_names(loaded), dict(loaded.named_parameters())
    handmade = [n for n in deltas if ".norm" in n or n.endswith("modulation")]  # what diffusers drops
    assert len(handmade) == 2 * (4 + 2) + 2 + 1
    with torch.no_grad():
        for name in handmade:
            params[names[name]] += torch.from_numpy(deltas[name]).reshape(params[names[name]].shape)

    x, t, context, _, _ = inputs("t2v")
    expected, _ = torch_forward(loaded, x, t, context)
    assert relative_error(torch_forward(torch_model, x, t, context)[0], expected) > 1e-2

    _, ours = save_and_convert(torch_model, tmp_path / "m")
    assert len({u.target for u in lora_updates(path, ours.config)}) == len(deltas)  # every tensor placed
    merge_loras(ours, [(path, 1.0)])
    args, kwargs = ours_kwargs(x, t, context)
    out = np.moveaxis(np.asarray(_call(ours, *args, **kwargs)), -1, 1)
    assert relative_error(out, expected) <= 1e-4


def test_diff_m_and_modulation_diff_are_the_same_delta_and_not_both(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    delta = np.random.default_rng(1).normal(size=(1, 6, 40)).astype(np.float32)
    save_file({"diffusion_model.blocks.1.diff_m": delta}, str(tmp_path / "m.safetensors"))
    save_file({"diffusion_model.blocks.1.modulation.diff": delta}, str(tmp_path / "d.safetensors"))
    (via_m,), (via_diff,) = lora_updates(tmp_path / "m.safetensors", ours.config), lora_updates(
        tmp_path / "d.safetensors", ours.config)  # fmt: skip
    assert via_m.target == via_diff.target == "blocks.1.modulation"
    np.testing.assert_array_equal(np.asarray(via_m.delta()), delta)
    save_file({"diffusion_model.blocks.1.diff_m": delta, "diffusion_model.blocks.1.modulation.diff": delta},
              str(tmp_path / "both.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="a second diff tensor for diffusion_model.blocks.1.modulation"):
        lora_updates(tmp_path / "both.safetensors", ours.config)
