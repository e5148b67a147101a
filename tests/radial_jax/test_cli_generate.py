"""`radial-jax generate`: the README's first command end to end (tiny preset, no checkpoint),
deterministic mp4s of the requested size, and one-line errors for bad arguments."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from radial_jax.cli import main

SMALL = ["--frames", "9", "--size", "64x32", "--steps", "3", "--dense-timesteps", "1"]


def _read_mp4(path):
    import imageio.v2 as imageio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)  # ffmpeg child: exec only
        with imageio.get_reader(path) as reader:
            return [frame for frame in reader], reader.get_meta_data()["fps"]


def test_readme_command_writes_a_readable_mp4_and_says_it_is_noise(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "radial_jax.cli", "generate", "--out", "demo.mp4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tiny preset" in proc.stdout and "meaningless" in proc.stdout and "wrote demo.mp4" in proc.stdout
    assert "s/step" in proc.stderr  # the progress bar
    frames, fps = _read_mp4(tmp_path / "demo.mp4")
    assert len(frames) == 17 and frames[0].shape == (96, 160, 3) and fps == 16


def test_same_seed_gives_the_same_mp4_and_another_seed_does_not(tmp_path):
    paths = {name: tmp_path / f"{name}.mp4" for name in ("a", "b", "c")}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["generate", *SMALL, "--seed", str(seed), "--out", str(paths[name])]) == 0
    assert paths["a"].read_bytes() == paths["b"].read_bytes() != paths["c"].read_bytes()
    frames, _ = _read_mp4(paths["a"])
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)


def test_image_without_checkpoint_runs_the_tiny_i2v_preset(tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 30), (200, 30, 30)).save(tmp_path / "first.png")
    out = tmp_path / "i2v.mp4"
    assert main(["generate", *SMALL, "--image", str(tmp_path / "first.png"), "--out", str(out)]) == 0
    assert len(_read_mp4(out)[0]) == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "80"], "frames=80 must be 4k+1"),
        (["--size", "830x480"], "multiples of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--lora", "style.safetensors:0.5"], "--lora style.safetensors:0.5: no such .safetensors file"),
        (["--ckpt", "no/such/folder"], "convert the whole Wan2.1"),
        (["--image", "no_such.png"], "--image no_such.png: cannot read it"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, message, capsys, tmp_path):
    assert main(["generate", *args, "--out", str(tmp_path / "x.mp4")]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("radial-jax generate: error:")
    assert not (tmp_path / "x.mp4").exists()


def test_lora_is_merged_before_generating_and_changes_the_video(tmp_path, capsys):
    from safetensors.numpy import save_file

    from models.wan import pipeline

    config = pipeline.TINY_T2V
    rng = np.random.default_rng(0)
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": rng.normal(size=(4, config.dim)).astype("f4"),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rng.normal(size=(config.dim, 4)).astype("f4"),
               "diffusion_model.blocks.0.ffn.2.lora_down.weight": rng.normal(size=(4, config.ffn_dim)).astype("f4"),
               "diffusion_model.blocks.0.ffn.2.lora_up.weight": rng.normal(size=(config.dim, 4)).astype("f4")},
              str(lora))  # fmt: skip
    plain, merged = tmp_path / "plain.mp4", tmp_path / "lora.mp4"
    assert main(["generate", *SMALL, "--out", str(plain)]) == 0
    assert main(["generate", *SMALL, "--lora", f"{lora}:0.8", "--out", str(merged)]) == 0
    assert f"merged LoRA {lora} (strength 0.8)" in capsys.readouterr().out
    assert plain.read_bytes() != merged.read_bytes()
    assert len(_read_mp4(merged)[0]) == 9


def test_lora_that_does_not_fit_fails_before_loading(tmp_path, capsys):
    from safetensors.numpy import save_file

    lora = tmp_path / "other.safetensors"
    save_file({"diffusion_model.blocks.30.self_attn.q.lora_down.weight": np.ones((4, 8), "f4"),
               "diffusion_model.blocks.30.self_attn.q.lora_up.weight": np.ones((8, 4), "f4")}, str(lora))  # fmt: skip
    assert main(["generate", *SMALL, "--lora", str(lora), "--out", str(tmp_path / "x.mp4")]) != 0
    captured = capsys.readouterr()
    assert "blocks.30.self_attn.q.lora_down.weight: not a module of this DiT" in captured.err
    assert "loaded in" not in captured.out and not (tmp_path / "x.mp4").exists()
