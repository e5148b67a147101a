"""Wan2.2 A14B folders (original high_noise_model/ + low_noise_model/, diffusers transformer/ +
transformer_2/ + model_index.json) convert in one call; each converted expert equals its torch
model in f32; the switch comes from the checkpoint where it is stored; the CLI generates from
the converted pair; mismatched pairs and TI2V-5B are refused before anything is written."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import CheckpointError, convert_checkpoint, load_pipeline
from convert.wan22 import TI2V_REFUSAL
from models.wan.experts import WAN22_I2V_A14B, WAN22_T2V_A14B, ExpertSwitch
from models.wan.pipeline import generate
from pipeline_testing import A14B_EXPERT_SEEDS, Z_DIM, a14b_diffusers_folder, a14b_original_folder, tiny_expert
from radial_jax.cli import main
from wan_testing import LATENT, channels_last, relative_error, torch_forward

A14B_PARTS = ["transformer", "transformer_2", "experts.json", "vae", "text_encoder", "tokenizer"]
TOLERANCE = 1e-5  # f32 against torch: ~1e-6 seen; a swapped or missing tensor gives O(1)
VIDEO = dict(frames=5, height=32, width=32, steps=3)


def expert_inputs(kind: str, seed: int = 3):
    """Returns torch inputs channels-first: latents [1, 16, F, H, W], timestep, text, y (I2V)."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = LATENT
    x = torch.randn(1, Z_DIM, f, h, w, generator=g)
    y = torch.randn(1, 36 - Z_DIM, f, h, w, generator=g) if kind == "i2v" else None
    return x, torch.tensor([901.0]), torch.randn(1, 9, 32, generator=g), y


def assert_experts_equal_torch(components, kind: str):
    x, t, context, y = expert_inputs(kind)
    for dit, seed in zip((components.dit, components.low_noise_dit), A14B_EXPERT_SEEDS):
        expected, _ = torch_forward(tiny_expert(kind, seed), x, t, context, y=y)
        timestep, text = jnp.asarray(t.numpy()), jnp.asarray(context.numpy())
        ours = dit(channels_last(x), timestep, text, y=channels_last(y), dense=True)
        assert relative_error(np.moveaxis(np.asarray(ours), -1, 1), expected) <= TOLERANCE, f"expert seed {seed}"


def test_diffusers_t2v_pair_converts_each_expert_to_its_torch_model_and_reads_the_boundary(tmp_path):
    src = a14b_diffusers_folder(tmp_path / "Wan2.2-T2V-A14B-Diffusers", "t2v", boundary_ratio=0.8)
    assert convert_checkpoint(src, tmp_path / "ours", dtype="f32", progress=False) == A14B_PARTS
    components = load_pipeline(tmp_path / "ours")
    assert components.dit.config == components.low_noise_dit.config and components.dit.config.model_type == "t2v"
    assert_experts_equal_torch(components, "t2v")
    # the boundary is model_index.json's (0.8 here, not the preset's 0.875); the rest the original's defaults
    assert components.experts.boundary == 0.8 and components.experts.guidance == WAN22_T2V_A14B.guidance
    meta = json.loads((tmp_path / "ours" / "experts.json").read_text())
    assert meta["source"]["layout"] == "diffusers" and meta["task"] == "t2v"


def test_original_i2v_pair_converts_without_clip_and_generates_from_an_image(tmp_path):
    src = a14b_original_folder(tmp_path / "Wan2.2-I2V-A14B", "i2v")
    assert convert_checkpoint(src, tmp_path / "ours", dtype="f32", progress=False) == A14B_PARTS
    components = load_pipeline(tmp_path / "ours")
    config = components.dit.config
    assert (config.model_type, config.in_dim, config.uses_clip) == ("i2v", 36, False)
    assert components.image_encoder is None and components.experts == WAN22_I2V_A14B
    assert_experts_equal_torch(components, "i2v")
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    video = generate(components, "a cat", image=image, shift=3.0, **VIDEO)
    assert video.shape == (5, 32, 32, 3)


def test_cli_generates_from_a_converted_original_t2v_pair(tmp_path, capsys):
    src = a14b_original_folder(tmp_path / "Wan2.2-T2V-A14B", "t2v")
    dst, out = tmp_path / "ours", tmp_path / "video.mp4"
    assert main(["convert", "--src", str(src), "--dst", str(dst), "--dtype", "f32"]) == 0
    assert ExpertSwitch.from_dict(json.loads((dst / "experts.json").read_text())["config"]) == WAN22_T2V_A14B
    args = ["generate", "--ckpt", str(dst), "--frames", "5", "--size", "32x32", "--steps", "3", "--shift", "3",
            "--guidance", "4", "--guidance-low", "2.5", "--attention", "dense", "--out", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and "two experts" in capsys.readouterr().out
    (tmp_path / "lora.safetensors").write_bytes(b"")  # refused before it is read
    assert main(["generate", "--ckpt", str(dst), "--lora", str(tmp_path / "lora.safetensors")]) == 2
    assert "--lora on a Wan2.2 A14B checkpoint (two experts) is not supported" in capsys.readouterr().err


def test_diffusers_pair_without_boundary_ratio_is_refused_and_nothing_is_written(tmp_path):
    src = a14b_diffusers_folder(tmp_path / "src", "t2v", boundary_ratio=None)
    with pytest.raises(CheckpointError, match="no boundary_ratio beside transformer_2/"):
        convert_checkpoint(src, tmp_path / "ours", dtype="f32", progress=False)
    assert not (tmp_path / "ours").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_experts_of_different_architectures_are_refused(tmp_path):
    src = a14b_original_folder(tmp_path / "src", "t2v")
    low = src / "low_noise_model"
    config = json.loads((low / "config.json").read_text())
    from pipeline_testing import save_original_dit

    for path in low.iterdir():
        path.unlink()
    save_original_dit(tiny_expert("i2v", 1), low, model_type="i2v")
    with pytest.raises(CheckpointError, match=r"experts differ in architecture .*'in_dim': \(16, 36\)"):
        convert_checkpoint(src, tmp_path / "ours", dtype="f32", progress=False)
    assert config["in_dim"] == 16 and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("sign", ["original_vae", "original_config", "diffusers_index", "diffusers_vae",
                                  "diffusers_transformer"])  # fmt: skip
def test_ti2v_5b_folders_are_refused_in_one_line_naming_what_is_supported(tmp_path, sign, capsys):
    src = tmp_path / "Wan2.2-TI2V-5B"
    src.mkdir()
    files = {
        "original_vae": ("Wan2.2_VAE.pth", b""),
        "original_config": ("config.json", json.dumps({"model_type": "ti2v", "in_dim": 48, "out_dim": 48})),
        "diffusers_index": ("model_index.json", json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True})),
        "diffusers_vae": ("vae/config.json", json.dumps({"z_dim": 48})),
        "diffusers_transformer": ("transformer/config.json", json.dumps({"in_channels": 48, "out_channels": 48})),
    }  # fmt: skip
    name, content = files[sign]
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(TI2V_REFUSAL) and "\n" not in err and "Wan2.2 T2V-A14B/I2V-A14B" in err
