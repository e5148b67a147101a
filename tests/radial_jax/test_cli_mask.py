"""`radial-jax mask` and `demo`: flags checked before any work, the PNG complete or absent,
help texts that say what each flag is."""

import pytest

from radial_jax.cli import main

TINY = ["--frames", "17", "--height", "96", "--width", "160"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--png", "{tmp}/nodir/m.png"], "--png {tmp}/nodir/m.png: folder {tmp}/nodir does not exist"),
        (["--png", "{tmp}/m.jpg"], "--png {tmp}/m.jpg: extension '.jpg'; use one of .png"),
        (["--decay-factor", "0"], "--decay-factor 0.0 must be > 0"),
        (["--decay-factor", "inf"], "--decay-factor inf must be > 0"),
        (["--block", "100"], "--block 100 must be a positive multiple of 16"),
        (["--extra-tokens", "-1"], "--extra-tokens -1 must be >= 0"),
        (["--frames", "80"], "frames=80 must be 4k+1"),
    ],
)
@pytest.mark.parametrize("command", ["mask", "demo"])
def test_bad_flag_is_one_line_before_any_output(command, args, message, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    png = [] if "--png" in args else ["--png", str(tmp_path / "m.png")]
    assert main([command, *TINY, *args, *png]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"radial-jax {command}: error: {message.format(tmp=tmp_path)}") and "\n" not in err
    assert captured.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--small-frames", "--small-tokens-per-frame", "--heads", "--head-dim"])
def test_demo_problem_sizes_must_be_positive(flag, tmp_path, capsys):
    assert main(["demo", *TINY, flag, "0", "--png", str(tmp_path / "m.png")]) == 2
    assert f"{flag} 0 must be >= 1" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_png_is_written_whole_under_its_name_and_nothing_else(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "mask.png"
    assert main(["mask", *TINY, "--png", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]
    with Image.open(png) as img:
        assert img.format == "PNG" and min(img.size) >= 480


def test_failure_while_drawing_keeps_the_previous_png(tmp_path, monkeypatch):
    from radial_jax import plot

    png = tmp_path / "mask.png"
    png.write_bytes(b"previous")

    def failing_save(block_mask, path, **kwargs):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(plot, "save_block_mask_png", failing_save)
    assert main(["mask", *TINY, "--png", str(png)]) == 2
    assert png.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_help_says_frames_are_video_frames_and_where_decay_defaults_differ(capsys):
    texts = {}
    for command in ("mask", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    assert "video frames, 4k+1" in texts["mask"] and "frames in pixels" not in texts["mask"]
    assert "default 1.0" in texts["mask"] and "generate defaults to 0.2" in texts["mask"]
    assert "default 0.2; mask and demo default to 1.0" in texts["generate"]


def test_demo_checks_radial_attention_against_float64_and_writes_its_png(tmp_path, capsys):
    png = tmp_path / "radial_mask.png"
    assert main(["demo", *TINY, "--small-frames", "3", "--small-tokens-per-frame", "100", "--png", str(png)]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("radial attention on 300 tokens x 2 heads") and "max error vs float64" in line
    assert float(line.rsplit(" ", 1)[1]) < 1e-4 and png.is_file()
    assert "Warning" not in captured.err  # the implementation is named, so nothing warns mid-output
