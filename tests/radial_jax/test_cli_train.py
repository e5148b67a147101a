"""`radial-jax train` end to end on the tiny preset: prepare --synthetic -> train -> export ->
generate --lora, and its one-line errors."""

import os
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

from radial_jax.cli import main

SIZE = ["--size", "64x64", "--frames", "9"]
TRAIN_SIZE = ["--set", "data.frames=9", "--set", "data.height=64", "--set", "data.width=64"]
GENERATE = ["--frames", "9", "--size", "64x64", "--steps", "3"]


def _frames(path):
    import imageio.v2 as imageio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with imageio.get_reader(path) as reader:
            return np.stack([frame for frame in reader]).astype(np.int16)  # list(reader) would trust len() = inf


def test_prepare_train_export_generate(tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["prepare", str(tmp_path / "clips"), "--synthetic", "3", "--out", str(cache), *SIZE]) == 0
    assert main(["train", "--config", "tiny", "--no-progress", *TRAIN_SIZE, "--set", f"data.cache={cache}",
                 "--set", "data.batch_size=1", "--set", "run.steps=3", "--set", f"run.out={run}",
                 "--mesh", "fsdp=-1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"{run}: step 3 of 3" in out and f"--lora {run / 'lora.safetensors'}" in out
    lora = load_file(run / "lora.safetensors")
    assert "transformer.blocks.1.attn1.to_out.0.lora_B.weight" in lora
    assert max(float(np.abs(t).max()) for n, t in lora.items() if "lora_B" in n) > 0
    assert (run / "metrics.csv").is_file() and any((run / "tensorboard").iterdir())
    # The tiny preset samples every 10 steps and at the last: step 3's video, at the trained size.
    assert f"step 3: sample {run / 'samples' / 'step-000003.mp4'}" in out
    assert [p.name for p in (run / "samples").iterdir()] == ["step-000003.mp4"]
    assert _frames(run / "samples" / "step-000003.mp4").shape == (9, 64, 64, 3)

    assert main(["export", str(run), "--out", str(tmp_path / "comfy.safetensors")]) == 0
    videos = {name: tmp_path / f"{name}.mp4" for name in ("plain", "trained", "comfy")}
    assert main(["generate", *GENERATE, "--out", str(videos["plain"])]) == 0
    assert main(["generate", *GENERATE, "--lora", str(run / "lora.safetensors"), "--out", str(videos["trained"])]) == 0
    assert main(["generate", *GENERATE, "--lora", str(tmp_path / "comfy.safetensors"), "--out",
                 str(videos["comfy"])]) == 0  # fmt: skip
    frames = {name: _frames(path) for name, path in videos.items()}
    assert np.abs(frames["trained"] - frames["comfy"]).max() <= 1  # the same LoRA under both namings
    assert not np.array_equal(frames["trained"], frames["plain"])


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "config nope: no such file (shipped configs: tiny"),
    (["--config", "tiny", "--set", "lora.rnak=2"], "valid keys of [lora]: rank, alpha, targets"),
    (["--config", "tiny", "--mesh", "data=3"], "--mesh 'data=3' has 3 devices"),
    (["--config", "tiny", "--set", "data.cache={tmp}/none"], "no manifest.json; make a cache first"),
])  # fmt: skip
def test_bad_input_is_one_line_on_stderr(tmp_path, capsys, args, message):
    from tests.train.test_loop import _cache

    if "--mesh" in args:  # a valid cache, so that the mesh is what fails
        args = [*args, *TRAIN_SIZE, "--set", f"data.cache={_cache(tmp_path / 'c', 2)}"]
    argv = ["train", *[a.format(tmp=tmp_path) for a in args], "--set", f"run.out={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("radial-jax train: error: ") and message in err


@pytest.mark.parametrize("preset, expected", [(None, "0.95"), ("0.6", "0.6")])
def test_train_lifts_jaxs_gpu_memory_cap_unless_the_environment_sets_one(tmp_path, monkeypatch, preset, expected):
    # The 14B step at 720p-81f needs ~103 GiB of an H200: more than JAX's default 75% cap.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", preset or "")  # monkeypatch restores it after
    if preset is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    assert main(["train", "--config", "nope", "--set", f"run.out={tmp_path / 'run'}"]) == 2  # fails after the setting
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == expected
