"""`radial-jax prepare` end to end on the tiny preset: synthetic clips cached and readable by the
training reader, a corrupt file listed with its reason, bad input one line on stderr."""

import pytest

from radial_jax.cli import main
from train.data import LatentDataset
from train.video import write_synthetic_dataset

SMALL = ["--size", "64x64", "--frames", "9"]


def test_prepare_synthetic_writes_a_cache_the_reader_accepts(tmp_path, capsys):
    argv = ["prepare", str(tmp_path / "shapes"), "--synthetic", "2", "--out", str(tmp_path / "cache"), *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 synthetic clips" in out and "2 samples (2 encoded now, 0 already cached)" in out
    dataset = LatentDataset(tmp_path / "cache")
    dataset.check(latent_shape=(3, 8, 8, 16))
    assert len(dataset) == 2 and len(list((tmp_path / "shapes").glob("*.txt"))) == 2
    assert main(argv) == 0  # the same command again: clips and samples reused
    assert "2 samples (0 encoded now, 2 already cached)" in capsys.readouterr().out


def test_prepare_lists_a_corrupt_video_and_caches_the_rest(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "clips", 2, frames=9, width=64, height=64)
    (tmp_path / "clips" / "broken.webm").write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 300)
    (tmp_path / "clips" / "broken.txt").write_text("a broken clip")
    assert main(["prepare", str(tmp_path / "clips"), "--out", str(tmp_path / "cache"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "2 samples" in out and "skipped 1 videos:\n  broken.webm: " in out
    assert len(LatentDataset(tmp_path / "cache")) == 2


@pytest.mark.parametrize("argv, message", [
    (["prepare", "{tmp}/missing", "--out", "{tmp}/c"], "missing: no such folder or .jsonl file"),
    (["prepare", "{tmp}", "--out", "{tmp}/c"], "no videos"),
    (["prepare", "{tmp}", "--out", "{tmp}/c", "--size", "64"], "--size '64' must be WIDTHxHEIGHT"),
    (["prepare", "{tmp}", "--out", "{tmp}/c", "--size", "72x64"], "size 72x64 (width x height) must be positive multiples of 16"),
    (["prepare", "{tmp}", "--out", "{tmp}/c", "--frames", "10"], "frames=10 must be 4k+1"),
    (["prepare", "{tmp}", "--out", "{tmp}/c", "--mode", "uniform", "--windows", "0"], "--windows 0 must be >= 1"),
    (["prepare", "{tmp}", "--out", "{tmp}", "--synthetic", "1"], "exists and is not a latent cache"),
])  # fmt: skip
def test_bad_input_is_one_line_on_stderr(tmp_path, capsys, argv, message):
    (tmp_path / "note.md").write_text("not a video")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("radial-jax prepare: error: ") and message in err
