"""LoRA export (train/export.py): the file merged by our `generate --lora` loader equals the model
with its LoRA layers; diffusers' WanTransformer3DModel (same random weights through our converter)
with the file loaded as an adapter, by the model's load_lora_adapter and by WanPipeline's
load_lora_weights, equals our output; the ComfyUI spelling gives the same."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from convert.lora import merge_loras
from models.wan import WAN_TINY, WanModel
from models.wan.pipeline import random_weights
from tests.wan_testing import inputs, ours_kwargs, relative_error, save_and_convert, tiny_diffusers, torch_forward
from train.export import export_lora, lora_tensors, our_path, read_exported
from train.lora import (
    CROSS_ATTENTION, FFN, SELF_ATTENTION, LoraConfig, apply_lora, linear_paths, lora_factors, lora_modules, module_name,
)  # fmt: skip

CONFIG = dataclasses.replace(WAN_TINY, num_layers=2)
LORA = LoraConfig(rank=3, alpha=7.0, targets=SELF_ATTENTION + CROSS_ATTENTION + FFN)  # alpha != rank: a lost scale shows


def _base():
    """The tiny DiT with seeded weights (numpy-drawn: the modules' own initialisers compile per shape)."""
    return random_weights(lambda rngs: WanModel(CONFIG, rngs=rngs), 0)


def _perturb_b(model, seed: int = 1, std: float = 0.3):
    """Random lora_b everywhere (zero at init would hide a wrong name or scale)."""
    for i, module in enumerate(lora_modules(model).values()):
        shape = module.lora_b[...].shape
        module.lora_b.set_value(std * jax.random.normal(jax.random.key(seed + i), shape, jnp.float32))


def _inputs():
    keys = jax.random.split(jax.random.key(0), 2)
    latents = jax.random.normal(keys[0], (1, 2, 4, 6, CONFIG.in_dim), jnp.float32)
    return latents, jnp.array([600.0], jnp.float32), jax.random.normal(keys[1], (1, 5, CONFIG.text_dim), jnp.float32)


@nnx.jit
def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


@pytest.mark.parametrize("format", ["diffusers", "comfy"])
def test_exported_file_merged_by_generates_loader_equals_the_lora_model(tmp_path, format):
    trained = apply_lora(_base(), LORA, rngs=nnx.Rngs(1))
    _perturb_b(trained)
    want = np.asarray(_call(trained, *_inputs()))
    base = _base()
    assert relative_error(np.asarray(_call(base, *_inputs())), want) > 1e-2  # the LoRA changes the output
    path = export_lora(trained, tmp_path / "lora.safetensors", format=format)
    merge_loras(base, [(path, 1.0)])
    assert relative_error(np.asarray(_call(base, *_inputs())), want) <= 1e-5


def test_file_names_and_alpha_in_each_format():
    factors = {"blocks.1.self_attn.o": (np.ones((3, 8), np.float32), np.ones((5, 3), np.float32), 6.0),
               "blocks.0.ffn.2": (np.ones((3, 4), np.float32), np.ones((8, 3), np.float32), 6.0)}  # fmt: skip
    diffusers = lora_tensors(factors, "diffusers")
    assert sorted(diffusers) == ["transformer.blocks.0.ffn.net.2.lora_A.weight", "transformer.blocks.0.ffn.net.2.lora_B.weight",
                                 "transformer.blocks.1.attn1.to_out.0.lora_A.weight",
                                 "transformer.blocks.1.attn1.to_out.0.lora_B.weight"]  # fmt: skip
    assert np.all(diffusers["transformer.blocks.1.attn1.to_out.0.lora_B.weight"] == 2.0)  # alpha / rank folded
    comfy = lora_tensors(factors, "comfy")
    assert sorted(comfy) == ["diffusion_model.blocks.0.ffn.2.alpha", "diffusion_model.blocks.0.ffn.2.lora_down.weight",
                             "diffusion_model.blocks.0.ffn.2.lora_up.weight", "diffusion_model.blocks.1.self_attn.o.alpha",
                             "diffusion_model.blocks.1.self_attn.o.lora_down.weight",
                             "diffusion_model.blocks.1.self_attn.o.lora_up.weight"]  # fmt: skip
    assert comfy["diffusion_model.blocks.1.self_attn.o.alpha"] == 6.0
    assert np.all(comfy["diffusion_model.blocks.1.self_attn.o.lora_up.weight"] == 1.0)  # B as trained


def test_metadata_records_the_training(tmp_path):
    trained = apply_lora(_base(), LoraConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    path = export_lora(trained, tmp_path / "a.safetensors", metadata={"config": "tiny"})
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    summary = json.loads(metadata["radial_jax"])
    assert metadata["config"] == "tiny" and summary["rank"] == 2 and summary["alpha"] == 4.0
    assert summary["alpha_folded_into_lora_B"] and len(summary["modules"]) == 8
    assert "lora_adapter_metadata" not in metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    """(diffusers model, ours with a trained-looking LoRA, our output on the torch inputs)."""
    torch_model = tiny_diffusers("t2v", seed=3)
    _, ours = save_and_convert(torch_model, tmp_path_factory.mktemp("base"))
    apply_lora(ours, LORA, rngs=nnx.Rngs(4))
    _perturb_b(ours, seed=9, std=0.5)
    args, kwargs = ours_kwargs(*inputs("t2v"))
    out = np.moveaxis(np.asarray(_call(ours, *args, **kwargs)), -1, 1)
    return torch_model, ours, out


@pytest.mark.parametrize("format, loader", [("diffusers", "load_lora_adapter"), ("diffusers", "load_lora_weights"),
                                            ("comfy", "load_lora_weights")])  # fmt: skip
def test_diffusers_with_our_file_as_adapter_equals_our_output(diffusers_pair, tmp_path, format, loader):
    from diffusers import WanPipeline

    torch_model, ours, want = diffusers_pair
    x, t, context, _, _ = inputs("t2v")
    assert relative_error(torch_forward(torch_model, x, t, context)[0], want) > 1e-2
    path = export_lora(ours, tmp_path / "lora.safetensors", format=format)
    loaded = tiny_diffusers("t2v", seed=3)
    if loader == "load_lora_adapter":
        loaded.load_lora_adapter(str(path), prefix="transformer", adapter_name="trained")
    else:  # the pipeline entry point users call; it also converts the ComfyUI spelling
        WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=loaded).load_lora_weights(
            str(path), adapter_name="trained")  # fmt: skip
    assert sum(hasattr(m, "lora_A") for m in loaded.modules()) == len(lora_factors(ours)) == 20
    got, _ = torch_forward(loaded, x, t, context)
    assert relative_error(got, want) <= 1e-4


def test_export_refuses_what_it_cannot_write(tmp_path):
    one = (np.ones((3, 8), np.float32), np.ones((8, 3), np.float32), 3.0)
    two = (np.ones((2, 8), np.float32), np.ones((8, 2), np.float32), 2.0)
    with pytest.raises(ValueError, match="several ranks \\[2, 3\\]"):
        lora_tensors({"blocks.0.self_attn.q": one, "blocks.0.self_attn.k": two})
    with pytest.raises(ValueError, match="no LoRA to export"):
        export_lora(_base(), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_lora({"blocks.0.self_attn.q": one}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="format='kohya' must be one of"):
        lora_tensors({"blocks.0.self_attn.q": one}, "kohya")
    with pytest.raises(ValueError, match="not a Linear layer"):
        lora_tensors({"blocks.0.norm3": one})


@pytest.mark.parametrize("format", ["diffusers", "comfy"])
def test_read_exported_gives_back_the_trained_factors(tmp_path, format):
    trained = apply_lora(_base(), LORA, rngs=nnx.Rngs(1))
    _perturb_b(trained)
    want = lora_factors(trained)
    got = read_exported(export_lora(trained, tmp_path / "a.safetensors", format=format))
    assert sorted(got) == sorted(want)
    for path, (down, up, alpha) in want.items():
        np.testing.assert_array_equal(got[path][0], down)
        np.testing.assert_allclose(got[path][1], up, rtol=1e-6)  # diffusers: folded by 7/3, unfolded by 3/7
        assert got[path][2] == pytest.approx(alpha)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_our_path_inverts_module_name_on_every_linear(layout):
    paths = linear_paths(_base())
    assert len(paths) > 20
    assert [our_path(module_name(p, layout), layout) for p in paths] == paths


def test_read_exported_refuses_other_files(tmp_path):
    from safetensors.numpy import save_file

    name = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    save_file({name: np.ones((2, 4), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA exported by radial-jax"):
        read_exported(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"\x02")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        read_exported(tmp_path / "y.safetensors")
