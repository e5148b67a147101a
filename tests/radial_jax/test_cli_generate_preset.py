"""`radial-jax generate --preset lightx2v`: what the preset sets, explicit flags winning over it,
the run it makes (tiny preset: distilled sampler, one pass a step, the radial plan, an f32 VAE),
and one-line errors for timesteps that do not fit."""

import jax.numpy as jnp
import pytest

from radial_jax.cli import build_parser, main
from radial_jax.cli.generate import apply_preset

SMALL = ["--frames", "9", "--size", "64x32"]
LIGHTX2V = dict(sampler="distilled", timesteps="1000,750,500,250", shift=5.0, guidance=1.0, dense_layers=1,
                dense_timesteps=1, decay_factor=0.2, vae_dtype="f32", dense_implementation="mosaic")  # fmt: skip


def _args(*argv):
    args = build_parser().parse_args(["generate", *argv])
    apply_preset(args)
    return args


def test_preset_sets_every_value_it_names_and_nothing_is_set_without_it():
    args = _args("--preset", "lightx2v")
    assert {flag: getattr(args, flag) for flag in LIGHTX2V} == LIGHTX2V
    plain = _args()
    # guidance None: the checkpoint's, 5.0 (Wan2.1) or per expert (Wan2.2 A14B), set by check_request
    assert (plain.sampler, plain.timesteps, plain.shift, plain.guidance, plain.dense_timesteps, plain.vae_dtype,
            plain.dense_implementation) == ("unipc", None, None, None, 12, "f32", "dense")  # fmt: skip


def test_flags_given_explicitly_win_over_the_preset():
    args = _args("--preset", "lightx2v", "--sampler", "unipc", "--timesteps", "1000,500", "--shift", "8",
                 "--guidance", "2", "--dense-timesteps", "0", "--vae-dtype", "bf16", "--dense-implementation",
                 "dense")  # fmt: skip
    assert (args.sampler, args.timesteps, args.shift, args.guidance, args.dense_timesteps, args.vae_dtype,
            args.dense_implementation) == ("unipc", "1000,500", 8.0, 2.0, 0, "bf16", "dense")  # fmt: skip
    assert _args("--preset", "lightx2v", "--decay-factor", "1.0").decay_factor == 1.0


def test_lightx2v_preset_runs_four_distilled_steps_one_pass_each_with_an_f32_vae(tmp_path, capsys, monkeypatch):
    from models.wan import pipeline

    seen = {}
    real_generate, real_denoise = pipeline.generate, pipeline.denoise

    def generate(components, *args, **kwargs):
        seen.update(kwargs, vae_dtype=components.vae.decoder.conv1.kernel.get_value().dtype,
                    attention=components.plan)  # fmt: skip
        return real_generate(components, *args, **kwargs)

    def denoise(dit, sampler, noise, context, negative_context, *args, **kwargs):
        seen.update(sigmas=list(sampler.sigmas), negative_context=negative_context)
        return real_denoise(dit, sampler, noise, context, negative_context, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(pipeline, "denoise", denoise)
    assert main(["generate", *SMALL, "--preset", "lightx2v", "--out", str(tmp_path / "fast.mp4")]) == 0
    assert (tmp_path / "fast.mp4").stat().st_size > 0
    assert "4 steps (distilled), guidance 1" in capsys.readouterr().out
    assert (seen["sampler"], seen["steps"], seen["timesteps"], seen["shift"], seen["guidance"]) == (
        "distilled", 4, (1000.0, 750.0, 500.0, 250.0), 5.0, 1.0)  # fmt: skip
    assert seen["negative_context"] is None and seen["sigmas"] == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0])
    assert seen["vae_dtype"] == jnp.float32
    attention = seen["attention"]
    assert [attention.is_dense_step(i, 4) for i in range(4)] == [True, False, False, False]
    assert (attention.mode, attention.dense_layers, attention.decay_factor) == ("radial", 1, 0.2)
    # our Hopper kernel for the dense step, cuDNN (here: XLA on the CPU) where it cannot run
    assert attention.dense_implementation == ("mosaic", "dense")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timesteps", "1000,500"], "--timesteps is for --sampler distilled, not unipc"),
        (["--preset", "lightx2v", "--steps", "5"], "--steps 5: --sampler distilled runs one step per timestep (4)"),
        (["--sampler", "distilled", "--timesteps", "500,1000"], "--timesteps 500,1000 must be decreasing numbers"),
        (["--sampler", "distilled", "--timesteps", "999,x"], "--timesteps '999,x' must be comma-separated numbers"),
    ],
)
def test_timesteps_that_do_not_fit_exit_with_one_line(args, message, capsys, tmp_path):
    assert main(["generate", *SMALL, *args, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []
