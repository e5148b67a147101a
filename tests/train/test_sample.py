"""train/sample.py through train(): sample videos appear at every K steps and the last, are
readable mp4s of the configured size, are what `generate` makes with the exported LoRA merged,
compile their programs once, and change nothing in the training."""

import dataclasses

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.lora import merge_loras
from models.wan import pipeline
from tests.train.cache_testing import random_cache
from train import sample as sample_lib
from train.config import load_config
from train.logging import read_csv
from train.loop import model_config, train

# Latents 3 x 8 x 8 (48 tokens, 16-token mask blocks: layer 1 radial); samples 5 frames at 32x48
# (latents 2 x 4 x 6), 3 UniPC steps: the first dense (dense_timesteps 1), two radial. A high
# learning rate, so that the LoRA visibly changes the samples within 5 steps.
SMALL = ["data.frames=9", "data.height=64", "data.width=64", "data.batch_size=1", "run.steps=5", "run.log_every=1",
         "attention.dense_timesteps=1", "optim.learning_rate=1e-2", "optim.warmup_steps=0"]  # fmt: skip
SAMPLE = ["sample.every=2", "sample.steps=3", "sample.frames=5", "sample.height=32", "sample.width=48",
          "sample.guidance=4.0", "sample.seed=3", "sample.prompt='a red ball'"]  # fmt: skip


def _cache(root):
    arch = model_config(load_config("tiny"))
    return random_cache(root, 3, (3, 8, 8, arch.in_dim), context_dim=arch.text_dim, text_len=arch.text_len,
                        frames=9, height=64, width=64)  # fmt: skip


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio's ffmpeg child, reading the mp4s
def test_samples_every_k_steps_match_generate_and_leave_training_unchanged(tmp_path, monkeypatch):
    cache = _cache(tmp_path / "cache")
    written = {}
    write = sample_lib.write_mp4
    monkeypatch.setattr(sample_lib, "write_mp4", lambda path, video, fps: (written.update({path.name: video}),
                                                                          write(path, video, fps)))  # fmt: skip
    compiled = pipeline.denoise_step._cache_size()
    with_samples = load_config("tiny", [*SMALL, *SAMPLE, f"data.cache={cache}", f"run.out={tmp_path / 'a'}"])
    sampled = train(with_samples, progress=False, devices=jax.devices()[:1])
    assert pipeline.denoise_step._cache_size() - compiled == 2  # dense + radial step, reused by all 3 samples

    names = ["step-000002.mp4", "step-000004.mp4", "step-000005.mp4"]  # every 2, and the last
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == names
    for name in names:
        frames = np.stack(imageio.mimread(tmp_path / "a" / "samples" / name))
        assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
        assert abs(frames.astype(float).mean() - written[name].astype(float).mean()) < 3  # the video, encoded
    moved = np.abs(written[names[0]].astype(int) - written[names[-1]].astype(int)).mean()
    assert moved > 0.5  # the LoRA trained between steps 2 and 5 shows (about 2 levels on average)

    plain = train(dataclasses.replace(with_samples, sample=dataclasses.replace(with_samples.sample, every=0),
                                      run=dataclasses.replace(with_samples.run, out=str(tmp_path / "b"))),
                  progress=False, devices=jax.devices()[:1])  # fmt: skip
    assert not (tmp_path / "b" / "samples").exists()
    assert sampled.losses == plain.losses
    assert [r["loss"] for r in read_csv(tmp_path / "a")] == [r["loss"] for r in read_csv(tmp_path / "b")]
    lora_a, lora_b = load_file(sampled.lora_path), load_file(plain.lora_path)
    for name in lora_a:
        np.testing.assert_array_equal(lora_a[name], lora_b[name])

    # The last sample is generate's video with the exported LoRA merged into the same tiny DiT.
    components = pipeline.tiny_components(seed=0, attention=with_samples.attention)
    merge_loras(components.dit, [(sampled.lora_path, 1.0)])
    video = pipeline.generate(components, "a red ball", frames=5, height=32, width=48, steps=3, guidance=4.0,
                              shift=with_samples.objective.shift, seed=3, sampler="unipc")  # fmt: skip
    difference = np.abs(video.astype(int) - written[names[-1]].astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # merged vs unmerged LoRA: rounding only


@pytest.mark.parametrize("override, message", [
    ("sample.cache_index=7", r"sample.cache_index=7 but the cache holds 3 samples"),
    ("sample.frames=6", r"frames=6 must be 4k\+1"),
    ("sample.width=40", r"size 40x64 .* must be positive multiples of 16"),
])
def test_bad_sample_settings_fail_before_the_model_is_built(tmp_path, monkeypatch, override, message):
    from train import loop

    monkeypatch.setattr(loop, "build_model", lambda config: pytest.fail("the model was built first"))
    config = load_config("tiny", [*SMALL, "sample.every=2", 'sample.prompt=""', override, f"data.cache={_cache(tmp_path / 'c')}",
                                  f"run.out={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train(config, progress=False, devices=jax.devices()[:1])


def test_sample_steps_are_multiples_of_every_and_the_last():
    assert sample_lib.sample_steps(2, 0, 5) == [2, 4, 5]
    assert sample_lib.sample_steps(2, 3, 6) == [4, 6]  # a resumed run keeps the multiples
    assert sample_lib.sample_steps(0, 0, 5) == []


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "fsdp=2,sequence=4"])
def test_sample_on_a_mesh_equals_the_one_device_sample(tmp_path, monkeypatch, spec):
    """The sampler runs the DiT where training placed it: weights sharded over fsdp, and with a
    sequence axis each video's tokens split over it (sequence-parallel attention). The video is
    the one-device video, to float32 reduction-order noise (at most one uint8 level)."""
    from train.data import LatentDataset
    from train.loop import build_model
    from train.step import TrainStep, make_mesh, make_optimizer, split_model

    config = load_config("tiny", [*SMALL, *SAMPLE, 'sample.prompt=""', f"data.cache={_cache(tmp_path / 'c')}",
                                  f"run.out={tmp_path / 'run'}", "data.batch_size=2"])  # fmt: skip
    arch, dataset = model_config(config), LatentDataset(config.data.cache)
    graphdef, lora, base = split_model(build_model(config))
    lora = jax.tree.map(lambda x: x + 0.02, lora)  # a LoRA that changes the output
    videos = []
    monkeypatch.setattr(sample_lib, "write_mp4", lambda path, video, fps: videos.append(video))
    for devices, mesh_spec in ((jax.devices()[:1], ""), (jax.devices()[:8], spec)):
        mesh = make_mesh(mesh_spec, devices)
        tx, _ = make_optimizer(config.optim, config.run.steps)
        placed_lora, placed_base, _ = TrainStep(graphdef, tx, mesh, config.attention, config.objective).place(
            lora, base, tx.init(lora))  # fmt: skip
        sample_lib.Sampler(config, arch, dataset, mesh)(1, graphdef, placed_lora, placed_base)
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(placed_base))
    one, meshed = (v.astype(int) for v in videos)
    assert one.shape == (5, 32, 48, 3) and one.std() > 10  # a video, not a flat frame
    assert np.abs(one - meshed).max() <= 1
