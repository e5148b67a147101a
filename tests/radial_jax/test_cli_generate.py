"""`radial-jax generate`: the README's first command end to end (tiny preset, no checkpoint),
deterministic mp4s of the requested size, and one-line errors for bad arguments."""

import os
import re
import signal
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


def test_image_without_checkpoint_runs_the_tiny_i2v_preset(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (50, 30), (200, 30, 30)).save(tmp_path / "first.png")
    out = tmp_path / "i2v.mp4"
    assert main(["generate", *SMALL, "--image", str(tmp_path / "first.png"), "--out", str(out)]) == 0
    assert len(_read_mp4(out)[0]) == 9
    assert re.search(r"^image encode \(CLIP, VAE\): \d+\.\d s$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "80"], "frames=80 must be 4k+1"),
        (["--size", "830x480"], "multiples of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--guidance", "-1"], "--guidance -1.0 must be >= 0"),
        (["--shift", "0"], "--shift 0.0 must be > 0"),
        (["--seed", "-1"], "--seed -1 must be in 0..4294967295"),
        (["--seed", str(2**32)], "must be in 0..4294967295"),  # would alias seed 0 in jax.random.key
        (["--decay-factor", "-1"], "--decay-factor -1.0 must be > 0"),
        (["--decay-factor", "nan"], "--decay-factor nan must be > 0"),
        (["--dense-timesteps", "-2"], "--dense-timesteps -2 must be >= 0"),
        (["--dense-final-timesteps", "-1"], "--dense-final-timesteps -1 must be >= 0"),
        (["--dense-layers", "-1"], "--dense-layers -1 must be >= 0"),
        (["--dense-layers", "3"], "--dense-layers 3 is more than the DiT's 2 blocks"),
        (["--lora", "style.safetensors:0.5"], "--lora style.safetensors:0.5: style.safetensors does not exist"),
        (["--lora", "style.bin"], "--lora style.bin: not a .safetensors file"),
        (["--ckpt", "no/such/folder"], "--ckpt no/such/folder does not exist"),
        (["--image", "no_such.png"], "--image no_such.png: no such file"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, message, capsys, tmp_path):
    assert main(["generate", *args, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("radial-jax generate: error:"), err
    assert list(tmp_path.iterdir()) == []


def test_dense_steps_covering_every_step_are_pointed_out(tmp_path, capsys):
    assert main(["generate", "--frames", "9", "--size", "64x32", "--steps", "2", "--out", str(tmp_path / "x.mp4")]) == 0
    assert "cover all 2 steps: every step runs dense attention" in capsys.readouterr().out  # the default 12 dense


def test_only_the_wrong_flag_is_named(capsys, tmp_path):
    assert main(["generate", "--steps", "0", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--guidance" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "out, message",
    [
        ("missing/x.mp4", "folder {tmp}/missing does not exist"),
        ("noext", "no extension; use one of .mp4, .mkv, .mov, .avi"),
        ("x.webm", "extension '.webm'; use one of .mp4"),
        (".", "is a folder"),
    ],
)
def test_bad_output_path_fails_before_anything_is_loaded(out, message, capsys, tmp_path):
    assert main(["generate", "--out", str(tmp_path / out)]) == 2
    captured = capsys.readouterr()
    assert message.format(tmp=tmp_path) in captured.err and "\n" not in captured.err.strip()
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # not even the "tiny preset" line


def test_unwritable_output_folder_is_refused(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write anywhere (root)")
    assert main(["generate", "--out", str(locked / "x.mp4")]) == 2
    assert f"folder {locked} is not writable" in capsys.readouterr().err


def test_lora_strength_that_is_not_a_number_is_named(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    assert main(["generate", "--lora", f"{lora}:abc", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "strength 'abc' is not a number" in err and "does not exist" not in err


def _fake_checkpoint(root, config) -> str:
    """A converted folder holding only its DiT config: enough for every check made before loading."""
    from convert.checkpoint import write_metadata

    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (root / part).mkdir(parents=True)
    write_metadata(root / "transformer", "wan-transformer", config, {"layout": "test"})
    return str(root)


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("t2v", ["--image", "first.png"], "is a text-to-video model; drop --image"),
        ("i2v", [], "is an image-to-video model; pass the first frame with --image"),
        ("i2v", ["--image", "first.png"], "image-to-video model without image_encoder/"),
        ("t2v", ["--dense-layers", "5"], "--dense-layers 5 is more than the DiT's 2 blocks"),
    ],
)
def test_flags_are_checked_against_the_checkpoint_config_before_loading(kind, extra, message, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    from PIL import Image

    import convert
    from models.wan import pipeline

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save("first.png")
    ckpt = _fake_checkpoint(tmp_path / "ckpt", pipeline.TINY_I2V if kind == "i2v" else pipeline.TINY_T2V)
    monkeypatch.setattr(convert, "load_pipeline", lambda *a, **k: pytest.fail("loaded before checking"))
    assert main(["generate", "--ckpt", ckpt, *extra, "--out", "x.mp4"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_ckpt_with_a_damaged_config_names_the_file(tmp_path, capsys):
    from models.wan import pipeline

    ckpt = _fake_checkpoint(tmp_path / "ckpt", pipeline.TINY_T2V)
    (tmp_path / "ckpt" / "transformer" / "config.json").write_text('{"format": "radial-jax/wan-tra')
    assert main(["generate", "--ckpt", ckpt, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{ckpt}/transformer/config.json is not valid JSON" in err and "\n" not in err


def test_ckpt_that_is_a_file_is_named_as_one(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", "--ckpt", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "model.safetensors is a file; pass the folder radial-jax convert --dst wrote" in capsys.readouterr().err


def test_ctrl_c_while_sampling_prints_one_line_exits_130_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    from models.wan import pipeline

    real_denoise_step = pipeline.denoise_step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler raises KeyboardInterrupt
        return real_denoise_step(*args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise_step", interrupted_step)
    out = tmp_path / "x.mp4"
    assert main(["generate", *SMALL, "--out", str(out)]) == 130
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("radial-jax")]
    assert err_lines == [f"radial-jax generate: interrupted (SIGINT); no video written to {out}"]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_the_video_leaves_neither_file_nor_partial(tmp_path, capsys, monkeypatch):
    import imageio.v2 as imageio

    def killed_write(path, frames, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a video")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(imageio, "mimwrite", killed_write)
    out = tmp_path / "x.mp4"
    assert main(["generate", *SMALL, "--out", str(out)]) == 143
    assert f"interrupted (SIGTERM); no video written to {out}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_video(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    out = tmp_path / "x.mp4"
    out.write_bytes(b"the previous video")

    def failing_write(path, frames, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(imageio, "mimwrite", failing_write)
    assert main(["generate", *SMALL, "--out", str(out)]) == 2
    assert out.read_bytes() == b"the previous video" and [p.name for p in tmp_path.iterdir()] == ["x.mp4"]


def test_progress_times_the_encoder_and_decoder_and_marks_each_compiling_step(tmp_path, capsys):
    assert main(["generate", *SMALL, "--out", str(tmp_path / "x.mp4")]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^umT5 encode \(prompt, negative prompt\): \d+\.\d s$", captured.out, re.M)
    assert re.search(r"^VAE decode: \d+\.\d s$", captured.out, re.M)
    # SMALL: 3 steps, the first dense, then radial: each program's first step compiles.
    assert re.search(r"s/step \(incl\. compile\), dense", captured.err)
    assert re.search(r"s/step \(incl\. compile\), radial", captured.err)
    assert len(re.findall(r"\(incl\. compile\)", captured.err.replace("\r", "\n"))) >= 2


def test_warnings_during_sampling_print_above_the_bar_not_inside_it(tmp_path, capsys, monkeypatch):
    from models.wan import pipeline

    real_denoise_step = pipeline.denoise_step

    def warning_step(*args, **kwargs):
        warnings.warn("a warning raised mid-bar", UserWarning)
        return real_denoise_step(*args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise_step", warning_step)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["generate", *SMALL, "--out", str(tmp_path / "x.mp4")]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.replace("\r", "\n").splitlines() if "a warning raised mid-bar" in line]
    assert warned and all("denoising" not in line and "s/step" not in line for line in warned)


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


def test_sigterm_sent_to_a_running_generate_exits_143_with_one_line_and_no_file(tmp_path):
    out = tmp_path / "x.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "radial_jax.cli", "generate", "--frames", "9", "--size", "64x32",
                             "--steps", "400", "--dense-timesteps", "400", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    while "denoising" not in seen:  # the bar is up: sampling, the longest stage, is under way
        char = proc.stderr.read(1)
        assert char, f"exited before sampling: {seen}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    # Read the rest through the same text stream: communicate() reads the raw pipe and would miss
    # what read(1) has already buffered.
    err = seen + proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("radial-jax")]
    assert lines == [f"radial-jax generate: interrupted (SIGTERM); no video written to {out}"]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_mesh_sequence_4_gives_the_one_device_video(tmp_path, capsys, monkeypatch):
    from models.wan import transformer
    from radial_jax.cli import generate

    videos, split_over = [], []
    monkeypatch.setattr(generate, "write_video", lambda video, out, fps: videos.append(video))
    real_sequence_parallel = transformer.sequence_parallel

    def spy(attend, **kwargs):  # the DiT's self-attention went through the sequence-parallel path
        from radial_jax.parallel import sequence_parallel_size

        split_over.append(sequence_parallel_size())
        return real_sequence_parallel(attend, **kwargs)

    monkeypatch.setattr(transformer, "sequence_parallel", spy)
    for mesh in ([], ["--mesh", "sequence=4"]):
        assert main(["generate", *SMALL, *mesh, "--out", str(tmp_path / "v.mp4")]) == 0
    assert "tokens split over 4 devices" in capsys.readouterr().out
    assert split_over and set(split_over) == {4}
    one, four = (v.astype(np.int16) for v in videos)
    assert one.shape == four.shape and np.abs(one - four).max() <= 1  # f32 rounding may flip a level
    assert (one != four).mean() < 1e-3


@pytest.mark.parametrize("mesh, message", [("data=2", "use --mesh sequence=N"), ("sequence=64", "needs 64 devices"),
                                           ("sequence", "AXIS=SIZE")])
def test_bad_mesh_is_refused_before_loading(mesh, message, tmp_path, capsys):
    assert main(["generate", *SMALL, "--mesh", mesh, "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_interrupt_while_the_bar_draws_its_first_line_still_ends_that_line(monkeypatch, capsys):
    # The SIGTERM test above can land while tqdm is still inside its constructor, after it drew the bar's
    # first line but before the bar is registered to be closed: the interruption note then followed on
    # the bar's line (seen on a loaded 2-core machine). Here the constructor is interrupted at that point.
    import tqdm.auto

    from radial_jax.cli.generate import Progress

    class InterruptedBar:
        def __init__(self, **kwargs):
            print(f"\r{kwargs['desc']}:   0%|          | 0/{kwargs['total']}", end="", file=sys.stderr)
            raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.auto, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt), Progress(steps=4) as progress:
        progress.step(0, 4, dense=True)
    print("radial-jax generate: interrupted (SIGINT)", file=sys.stderr)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert lines[-2:] == ["denoising:   0%|          | 0/4", "radial-jax generate: interrupted (SIGINT)"]
