"""LoRA merging (convert/lora.py) vs the same LoRA merged into the PyTorch weights of a diffusers
model (W += alpha / rank * B @ A, the definition), through our converter; the naming variants
Wan LoRAs ship in; one error listing every key that does not fit."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert import CheckpointError
from convert.lora import lora_updates, merge_loras, parse_lora_arg
from tests.wan_testing import inputs, ours_kwargs, relative_error, save_and_convert, tiny_diffusers, torch_forward

RANK, ALPHA = 3, 6.0
# diffusers module -> original module, of the tiny model's Linear layers a LoRA usually targets
MODULES = {
    "blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "blocks.1.attn1.to_out.0": "blocks.1.self_attn.o",
    "blocks.0.attn2.to_k": "blocks.0.cross_attn.k",
    "blocks.1.ffn.net.0.proj": "blocks.1.ffn.0",
}


def _lora_factors(torch_model, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{diffusers module: (A [rank, in], B [out, rank])}, random, sized from the model."""
    rng = np.random.default_rng(seed)
    factors = {}
    for module in MODULES:
        out_dim, in_dim = torch_model.get_submodule(module).weight.shape
        factors[module] = (rng.normal(size=(RANK, in_dim)).astype(np.float32) * 0.3,
                           rng.normal(size=(out_dim, RANK)).astype(np.float32) * 0.3)
    return factors


def _write(path, factors, style: str):
    """Writes the LoRA in one of the spellings Wan LoRAs ship in."""
    tensors, metadata = {}, None
    for module, (a, b) in factors.items():
        if style == "peft_diffusers":  # diffusers' save_lora_weights: alpha in the metadata
            tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = a, b
            metadata = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
        elif style == "original_alpha":  # original names, per-module alpha
            name = f"diffusion_model.{MODULES[module]}"
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.array(ALPHA, np.float32)
        elif style == "kohya":
            name = "lora_unet_" + MODULES[module].replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.array([ALPHA], np.float32)
        elif style == "peft_adapter_named":  # PEFT with an adapter name, scale folded into B
            name = f"base_model.model.{MODULES[module]}"
            tensors[f"{name}.lora_A.default.weight"] = a
            tensors[f"{name}.lora_B.default.weight"] = b * (ALPHA / RANK)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_model = tiny_diffusers("t2v", seed=3)
    return torch_model, tmp_path_factory.mktemp("lora")


@nnx.jit
def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


def test_merged_lora_matches_the_lora_merged_into_diffusers_weights(base):
    torch_model, root = base
    factors = _lora_factors(torch_model)
    _, ours = save_and_convert(torch_model, root / "base")
    lora_model = tiny_diffusers("t2v", seed=3)
    with torch.no_grad():
        for module, (a, b) in factors.items():
            lora_model.get_submodule(module).weight += torch.from_numpy(ALPHA / RANK * b @ a)
    x, t, context, _, _ = inputs("t2v")
    expected, _ = torch_forward(lora_model, x, t, context)
    before, _ = torch_forward(torch_model, x, t, context)
    assert relative_error(before, expected) > 1e-2  # the LoRA changes the output

    merge_loras(ours, [(_write(root / "lora.safetensors", factors, "peft_diffusers"), 1.0)])
    args, kwargs = ours_kwargs(x, t, context)
    out = np.moveaxis(np.asarray(_call(ours, *args, **kwargs)), -1, 1)
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.parametrize("style", ["original_alpha", "kohya", "peft_adapter_named"])
def test_every_spelling_gives_the_same_updates(base, tmp_path, style):
    torch_model, _ = base
    factors = _lora_factors(torch_model)
    config = _config(torch_model, tmp_path)
    want = {u.target: u.delta for u in lora_updates(_write(tmp_path / "a.safetensors", factors, "peft_diffusers"),
                                                     config)}  # fmt: skip
    got = {u.target: u.delta for u in lora_updates(_write(tmp_path / "b.safetensors", factors, style), config)}
    assert sorted(got) == sorted(want) == sorted(f"{m}.kernel" for m in MODULES.values())
    for target, delta in want.items():
        np.testing.assert_allclose(got[target], delta, rtol=1e-6, atol=1e-7)


def test_strength_scales_and_two_loras_add(base, tmp_path):
    torch_model, root = base
    factors = _lora_factors(torch_model)
    path = _write(tmp_path / "a.safetensors", factors, "kohya")
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    kernel = lambda m: np.asarray(m.blocks[0].self_attn.q.kernel.get_value())  # noqa: E731
    start = kernel(ours)
    (update,) = [u for u in lora_updates(path, ours.config) if u.target == "blocks.0.self_attn.q.kernel"]
    merge_loras(ours, [(path, 0.5), (path, 0.25)])
    np.testing.assert_allclose(kernel(ours), start + 0.75 * update.delta, rtol=1e-5, atol=1e-6)


def test_weight_and_bias_diffs_are_added(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    q = ours.blocks[0].self_attn
    scale, bias = np.asarray(q.norm_q.scale.get_value()), np.asarray(q.q.bias.get_value())
    diff, diff_b = np.full(scale.shape, 0.5, np.float32), np.arange(bias.size, dtype=np.float32)
    path = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.norm_q.diff": diff,
               "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b}, str(path))  # fmt: skip
    merge_loras(ours, [(path, 2.0)])
    np.testing.assert_allclose(np.asarray(q.norm_q.scale.get_value()), scale + 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.q.bias.get_value()), bias + 2 * diff_b, rtol=1e-6)


def test_every_key_that_does_not_fit_is_listed_and_nothing_changes(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    a, b = np.ones((RANK, 40), np.float32), np.ones((40, RANK), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file({
        "transformer.blocks.0.attn1.to_q.lora_A.weight": a,  # fine
        "transformer.blocks.0.attn1.to_q.lora_B.weight": b,
        "transformer.blocks.0.attn1.to_k.lora_A.weight": a,  # no B
        "transformer.blocks.7.attn1.to_v.lora_A.weight": a,  # no block 7
        "transformer.blocks.7.attn1.to_v.lora_B.weight": b,
        "transformer.blocks.1.ffn.net.2.lora_A.weight": a,  # ffn.net.2 takes 48 inputs, not 40
        "transformer.blocks.1.ffn.net.2.lora_B.weight": b,
        "transformer.patch_embedding.lora_A.weight": a,  # a Conv3d
        "transformer.patch_embedding.lora_B.weight": b,
    }, str(path))  # fmt: skip
    before = np.asarray(ours.blocks[0].self_attn.q.kernel.get_value())
    with pytest.raises(CheckpointError) as err:
        merge_loras(ours, [(path, 1.0)])
    message = str(err.value)
    for fragment in ("5 problems", "transformer.blocks.0.attn1.to_k: a LoRA down (A) matrix without its partner",
                     "blocks.7.attn1.to_v.lora_A.weight: not a LoRA key", "blocks.1.ffn.2.kernel of shape (48, 40)",
                     "patch_embedding: LoRA of shapes"):  # fmt: skip
        assert fragment in message, message
    np.testing.assert_array_equal(np.asarray(ours.blocks[0].self_attn.q.kernel.get_value()), before)
    with pytest.raises(CheckpointError, match="does not exist"):
        lora_updates(tmp_path / "missing.safetensors", ours.config)


@pytest.mark.parametrize("arg, want", [("a.safetensors", ("a.safetensors", 1.0)),
                                       ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5)),
                                       ("a.safetensors:-1e-1", ("a.safetensors", -0.1)),
                                       ("C:/loras/a.safetensors", ("C:/loras/a.safetensors", 1.0))])
def test_lora_argument_parsing(arg, want):
    path, strength = parse_lora_arg(arg)
    assert (str(path), strength) == want


def _config(torch_model, tmp_path):
    return save_and_convert(torch_model, tmp_path / "cfg")[1].config
