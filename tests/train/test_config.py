"""train/config.py: TOML sections into frozen dataclasses, --set overrides, errors naming the
valid keys, the shipped configs, and the dict round trip a checkpoint stores."""

import dataclasses

import pytest

from radial_jax.kernels import DEFAULT_MOSAIC_BWD, KernelTuning
from radial_jax.plan import RadialPlan
from train.config import TrainConfig, load_config, shipped_configs
from train.lora import SELF_ATTENTION


def test_shipped_configs_load_and_say_what_they_train():
    assert {"tiny", "wan-1.3b-480p-161f", "wan-14b-720p-161f"} <= set(shipped_configs())
    tiny = load_config("tiny")
    assert tiny.model.ckpt == "" and tiny.model.dtype == "float32"
    assert tiny.lora.targets == SELF_ATTENTION and isinstance(tiny.attention, RadialPlan)
    for name in ("wan-1.3b-480p-161f", "wan-14b-720p-161f"):
        config = load_config(name)
        assert config.data.frames == 161 and config.attention.mode == "radial"
        assert config.attention.dense_layers == 2 and config.attention.dense_timesteps == 2  # the reference's 2x
        assert config.model.dtype == "bfloat16" and config.run.remat
    assert load_config("wan-14b-720p-161f").data.height == 720
    assert load_config("wan-1.3b-480p-161f").data.width == 832
    assert tiny.sample.every == 10 and tiny.sample.prompt  # the demo shows samples
    for name in ("wan-1.3b-480p-161f", "wan-14b-720p-161f"):  # every 250 of 2000 steps, at the trained length
        config = load_config(name)
        assert config.sample.every == 250 and config.run.steps == 2000 and config.sample.frames == 0


def test_overrides_parse_toml_values_and_bare_strings():
    config = load_config("tiny", ["optim.learning_rate=3e-4", "lora.rank=8", "run.remat=false",
                                  "data.cache=/data/my cache", 'lora.targets=["blocks.*.ffn.0"]',
                                  "attention.implementation=['pallas', 'reference']", "lora.alpha=16"])  # fmt: skip
    assert config.optim.learning_rate == 3e-4 and config.lora.rank == 8 and config.run.remat is False
    assert config.data.cache == "/data/my cache"
    assert config.lora.targets == ("blocks.*.ffn.0",)
    assert config.attention.implementation == ("pallas", "reference")
    assert config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)


def test_defaults_without_a_file_and_frozen():
    config = load_config(None, ["run.steps=5"])
    assert config.run.steps == 5 and config.lora == TrainConfig().lora
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run.steps = 6


@pytest.mark.parametrize("override, message", [
    ("lora.rnak=4", r"unknown key\(s\) lora\.rnak; valid keys of \[lora\]: rank, alpha, targets"),
    ("optimizer.learning_rate=1", r"unknown config section\(s\) \['optimizer'\]; valid sections: model, lora"),
    ("run.steps=ten", r"run\.steps='ten' must be a int"),
    ("lora.rank=2.5", r"lora\.rank=2\.5 must be a int"),
    ("steps=3", "must be section.key=value"),
    ("attention.mode=sparse", "mode='sparse' must be one of"),
])
def test_bad_settings_name_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_unknown_key_in_a_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[run]\nsteps = 3\nlearning_rate = 1e-4\n")
    with pytest.raises(ValueError, match=r"run\.learning_rate; valid keys of \[run\]: steps, out"):
        load_config(path)
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_dict_round_trip_is_exact():
    config = load_config("wan-14b-720p-161f", ["lora.targets=['blocks.*.ffn.0', 'blocks.*.ffn.2']"])
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_the_kernels_tuning_is_a_sub_table_over_the_defaults(tmp_path):
    # [attention.tuning.mosaic_bwd] changes only the fields it names of KernelTuning's default backward
    # (fused=false: the split kernels, deterministic dQ), here with the twin's matching switch by --set.
    path = tmp_path / "split.toml"
    path.write_text("[attention]\ndecay_factor = 0.5\n[attention.tuning.mosaic_bwd]\nfused = false\n")
    config = load_config(path, ["attention.tuning.triton_bwd.fused_backward=false"])
    tuning = config.attention.tuning
    assert isinstance(tuning, KernelTuning) and config.attention.decay_factor == 0.5
    assert tuning.mosaic_bwd == dataclasses.replace(DEFAULT_MOSAIC_BWD, fused=False)
    assert tuning.triton_bwd == dataclasses.replace(KernelTuning().triton_bwd, fused_backward=False)
    assert tuning.mosaic_fwd == KernelTuning().mosaic_fwd
    assert TrainConfig.from_dict(config.to_dict()) == config  # a checkpoint's config.json reads back as it was
    hash(config)  # still a jit static


@pytest.mark.parametrize("override, message", [
    ("attention.tuning.mosaic_bwd.fussed=false", r"attention\.tuning\.mosaic_bwd\.fussed; valid keys of "
                                                 r"\[attention\.tuning\.mosaic_bwd\]: block_q_dq"),
    ("attention.tuning.mosaic_bwd.memory_registers=x", r"memory_registers='x' must be a int"),
    ("attention.decay_factor.x=1", r"attention\.decay_factor is not a table"),
])
def test_bad_tuning_settings_name_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", ["attention.decay_factor=0.5", override])
