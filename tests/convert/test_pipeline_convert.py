"""Folder-level conversion: a whole tiny Wan2.1 checkpoint (original and diffusers layouts, T2V
and I2V) converts in one call into transformer/, vae/, text_encoder/, tokenizer/ [image_encoder/],
loads with load_pipeline and generates (from Python and from `radial-jax generate --ckpt`)."""

import json
import os
import stat
import warnings

import numpy as np
import pytest

from convert import CheckpointError, convert_checkpoint, load_pipeline
from models.wan.pipeline import generate
from pipeline_testing import diffusers_folder, original_folder
from radial_jax.cli import main

T2V_PARTS = ["transformer", "vae", "text_encoder", "tokenizer"]
VIDEO = dict(frames=5, height=32, width=32, steps=2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dtype(folder, key="dtype"):
    return json.loads((folder / "config.json").read_text())["config"][key]


def test_diffusers_folder_converts_every_part_with_normal_permissions_and_generates(tmp_path):
    src = diffusers_folder(tmp_path / "Wan2.1-T2V-tiny-Diffusers")
    dst = tmp_path / "ours"
    assert convert_checkpoint(src, dst, dtype="bf16", progress=False) == T2V_PARTS
    expected_mode = 0o777 & ~_umask()
    for folder in (dst, *(dst / part for part in T2V_PARTS)):
        assert stat.S_IMODE(folder.stat().st_mode) == expected_mode, folder
    assert _dtype(dst / "transformer", "param_dtype") == "bfloat16" and _dtype(dst / "text_encoder") == "bfloat16"
    assert _dtype(dst / "vae") == "float32"  # whatever --dtype says, as Wan runs it
    assert (dst / "tokenizer" / "spiece.model").is_file()
    out = tmp_path / "cat.mp4"  # through the command line, in bf16 as converted
    assert main(["generate", "--ckpt", str(dst), "--frames", "5", "--size", "32x32", "--steps", "2", "--out", str(out)]) == 0
    import imageio.v2 as imageio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)  # ffmpeg child: exec only
        frames = imageio.mimread(out)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)


def test_original_i2v_folder_converts_clip_too_and_generates_from_an_image(tmp_path):
    src = original_folder(tmp_path / "Wan2.1-I2V-tiny", kind="i2v")
    dst = tmp_path / "ours"
    assert convert_checkpoint(src, dst, dtype="f32", progress=False) == [*T2V_PARTS, "image_encoder"]
    components = load_pipeline(dst)
    assert components.dit.config.model_type == "i2v" and components.image_encoder is not None
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    video = generate(components, "a cat", image=image, **VIDEO)
    assert video.shape == (5, 32, 32, 3)


def test_load_pipeline_of_a_dit_only_conversion_names_the_missing_parts(tmp_path):
    src = diffusers_folder(tmp_path / "src")
    convert_checkpoint(src / "transformer", tmp_path / "dit_only", dtype="f32", progress=False)
    assert sorted(p.name for p in (tmp_path / "dit_only").iterdir()) == ["transformer"]
    with pytest.raises(CheckpointError, match=r"no vae/, text_encoder/, tokenizer/; convert the whole"):
        load_pipeline(tmp_path / "dit_only")


def test_diffusers_i2v_folder_converts_its_image_encoder(tmp_path):
    src = diffusers_folder(tmp_path / "Wan2.1-I2V-tiny-Diffusers", kind="i2v")
    assert convert_checkpoint(src, tmp_path / "ours", dtype="f32", progress=False) == [*T2V_PARTS, "image_encoder"]
    components = load_pipeline(tmp_path / "ours")
    assert components.image_encoder.config.num_layers == 3 and len(components.image_encoder.transformer) == 2
