"""train/loop.py through `radial-jax train`: a run stopped half way and resumed in a fresh
process equals the uninterrupted run; a NaN stops it keeping the last good checkpoint; bad
caches and refused resumes are one clear error before anything compiles."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.train.cache_testing import random_cache
from train.checkpoint import Checkpoints
from train.config import load_config
from train.data import CacheError, epoch_order
from train.logging import read_csv
from train.loop import TrainingError, model_config, train

REPO = Path(__file__).resolve().parents[2]
# Latents 3 x 8 x 8: 48 tokens; no sample videos (tests/train/test_sample.py has them).
SMALL = ["data.frames=9", "data.height=64", "data.width=64", "run.log_every=1", "sample.every=0"]


def _cache(root: Path, num_samples: int, *, latent=None, seed: int = 0) -> Path:
    arch = model_config(load_config("tiny"))
    return random_cache(root, num_samples, latent or (3, 8, 8, arch.in_dim), context_dim=arch.text_dim,
                        text_len=arch.text_len, frames=9, height=64, width=64, seed=seed)  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Runs `radial-jax train` in a fresh Python process on one CPU device."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "radial_jax.cli", "train", "--config", "tiny", "--no-progress",
                           *args], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _sets(*overrides: str) -> list[str]:
    return [arg for o in (*SMALL, *overrides) for arg in ("--set", o)]


def test_resumed_run_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path):
    """6 steps straight vs 3 steps, checkpoint, then a new process restoring it for 3 more: the
    same losses at every step, the same LoRA bit for bit. 5 samples in batches of 2: the run
    crosses epochs (the data order resumes too) and warmup + cosine span the cut."""
    cache = _cache(tmp_path / "cache", 5)
    common = _sets(f"data.cache={cache}", "run.steps=6", "run.save_every=2", "optim.warmup_steps=2")
    _cli(*common, "--set", f"run.out={tmp_path / 'straight'}")
    stopped = _cli(*common, "--set", f"run.out={tmp_path / 'resumed'}", "--stop-at", "3")
    assert "stopped at --stop-at 3" in stopped.stdout
    assert Checkpoints(tmp_path / "resumed" / "checkpoints").latest_step() == 3
    _cli(*common, "--set", f"run.out={tmp_path / 'resumed'}", "--resume")

    straight, resumed = read_csv(tmp_path / "straight"), read_csv(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    a, b = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 4 * 2  # A and B of q, k, v, o in 2 blocks
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert max(float(np.abs(t).max()) for n, t in a.items() if "lora_B" in n) > 0  # B trained away from zero


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """Step 3 draws a sample whose latents are NaN: no checkpoint of step 3, step 2 stays newest."""
    cache = _cache(tmp_path / "cache", 4)
    poisoned = cache / "samples" / f"s{epoch_order(4, 0, 0)[2]}.safetensors"
    tensors = load_file(poisoned)
    save_file({**tensors, "latents": np.full_like(tensors["latents"], np.nan)}, str(poisoned))
    config = load_config("tiny", [*SMALL, f"data.cache={cache}", "data.batch_size=1", f"run.out={tmp_path / 'run'}",
                                  "run.steps=6", "run.save_every=2"])  # fmt: skip
    with pytest.raises(TrainingError, match=r"loss is nan at step 3: stopped without saving; the last good "
                                            r"checkpoint is step 2"):  # fmt: skip
        train(config, progress=False, devices=jax.devices()[:1])
    assert Checkpoints(tmp_path / "run" / "checkpoints").all_steps() == [2]
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    with pytest.raises(TrainingError, match="already holds checkpoints .newest step 2.; pass --resume"):
        train(config, progress=False, devices=jax.devices()[:1])
    changed = load_config("tiny", [*SMALL, f"data.cache={cache}", "data.batch_size=1", f"run.out={tmp_path / 'run'}",
                                   "run.steps=6", "lora.rank=8"])  # fmt: skip
    with pytest.raises(TrainingError, match=r"differs from the checkpoint's in lora\.rank \(4 -> 8\)"):
        train(changed, resume=True, progress=False, devices=jax.devices()[:1])


@pytest.mark.parametrize("case, message", [
    ("latents", r"latents \[3, 8, 12, 16\] .* but the training config needs \[3, 8, 8, 16\]"),
    ("empty", "the cache holds no samples"),
    ("missing", "no manifest.json; make a cache first"),
    ("unset", "data.cache is empty"),
])
def test_bad_cache_is_one_error_before_building_anything(tmp_path, monkeypatch, case, message):
    from train import loop

    def must_not_build(config):
        raise AssertionError("the model was built before the cache was checked")

    monkeypatch.setattr(loop, "build_model", must_not_build)
    # ... and the checkpoint manager is closed on the way out: one left open prints an orbax thread's
    # traceback at interpreter exit, under the CLI's one-line error.
    closed = []
    close = Checkpoints.close
    monkeypatch.setattr(Checkpoints, "close", lambda self: closed.append(close(self)))
    cache = {"latents": lambda: _cache(tmp_path / "c", 2, latent=(3, 8, 12, 16)),
             "empty": lambda: _cache(tmp_path / "c", 0), "missing": lambda: tmp_path / "nothing",
             "unset": lambda: ""}[case]()  # fmt: skip
    config = load_config("tiny", [*SMALL, f"data.cache={cache}", f"run.out={tmp_path / 'run'}"])
    with pytest.raises((CacheError, ValueError), match=message):
        train(config, progress=False)
    assert len(closed) == 1


class _SavedConfigOnly(Checkpoints):
    """A checkpoint folder reduced to what _restore reads (no orbax): its config dict and a state."""

    def __init__(self, saved: dict):
        self.saved = saved

    def saved_config(self) -> dict:
        return self.saved

    def restore(self, template):
        return template, self.saved


def test_resume_takes_a_key_the_checkpoint_lacks_as_its_default_and_refuses_a_changed_one():
    # A checkpoint saved before attention.dense_implementation existed ran its default ("dense").
    from train.loop import _restore

    config = load_config("tiny", SMALL)
    state = {"data": {"epoch": 0, "index": 1}}
    older = config.to_dict()
    del older["attention"]["dense_implementation"]
    assert _restore(_SavedConfigOnly(older), state, config)["data"] == {"epoch": 0, "index": 1}
    other = config.to_dict()
    other["attention"]["dense_implementation"] = "mosaic"
    with pytest.raises(TrainingError, match=r"attention.dense_implementation \('mosaic' -> 'dense'\)"):
        _restore(_SavedConfigOnly(other), state, config)
    with pytest.raises(TrainingError, match=r"attention.dense_implementation \('dense' -> 'mosaic'\)"):
        _restore(_SavedConfigOnly(older), state, load_config("tiny", [*SMALL, "attention.dense_implementation=mosaic"]))


def test_resume_names_the_changed_leaf_of_the_kernels_tuning():
    # attention.tuning is a nested table: a resume that changes one field names that field, not the tables.
    from train.loop import _restore

    split = load_config("tiny", [*SMALL, "attention.tuning.mosaic_bwd.fused=false"])
    state = {"data": {"epoch": 0, "index": 0}}
    assert _restore(_SavedConfigOnly(split.to_dict()), state, split)["data"] == {"epoch": 0, "index": 0}
    fused = load_config("tiny", [*SMALL, "attention.tuning.mosaic_bwd.fused=true"])
    with pytest.raises(TrainingError, match=r"in attention\.tuning\.mosaic_bwd\.fused \(False -> True\); resume"):
        _restore(_SavedConfigOnly(split.to_dict()), state, fused)
    with pytest.raises(TrainingError, match=r"in attention\.tuning \(\{\.\.\.\} -> None\); resume"):
        _restore(_SavedConfigOnly(split.to_dict()), state, load_config("tiny", SMALL))
