"""`radial-jax convert` as a user meets it: a killed run's leftovers cleaned on the next run,
SIGTERM leaving nothing, a DiT-only result saying what it serves, a config-less folder saying
what is missing, and the destination checked before the source is read."""

import os
import signal
import subprocess
import sys

import pytest

from convert import CheckpointError, wan, wan_diffusers
from radial_jax.cli import main
from wan_testing import tiny_diffusers


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A diffusers transformer/ folder of a tiny T2V DiT (with its config.json)."""
    root = tmp_path_factory.mktemp("src")
    tiny_diffusers("t2v", seed=3).save_pretrained(root / "transformer", max_shard_size="30KB")
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_removes_partials_of_killed_runs_and_keeps_a_live_ones(dit_folder, tmp_path, capsys):
    dst = tmp_path / "ours"
    dead = tmp_path / f".ours.partial-{_dead_pid()}-0badc0de"
    legacy = tmp_path / ".ours.partial-1234abcd"  # the name before pids were recorded
    live = tmp_path / f".ours.partial-{os.getpid()}-00000000"
    other = tmp_path / f".other.partial-{_dead_pid()}-00000000"  # another destination's: not ours to touch
    for folder in (dead, legacy, live, other):
        folder.mkdir()
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    assert main(["convert", "--src", str(dit_folder), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"removed {dead}, left by an earlier conversion to {dst} that was killed" in out
    assert f"removed {legacy}" in out and str(live) not in out and str(other) not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "ours"])


def test_sigterm_while_writing_removes_the_partial_folder_and_exits_143(dit_folder, tmp_path, capsys, monkeypatch):
    from convert import io

    real_write, calls = io.SafetensorsWriter.write, []

    def killed_write(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into an exception here
        real_write(self, name, array)

    monkeypatch.setattr(io.SafetensorsWriter, "write", killed_write)
    handler_before = signal.getsignal(signal.SIGTERM)
    dst = tmp_path / "ours"
    assert main(["convert", "--src", str(dit_folder), "--dst", str(dst)]) == 143
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("radial-jax")]
    assert err_lines == [f"radial-jax convert: interrupted (SIGTERM); nothing written to {dst} "
                         "(its temporary folder was removed)"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored for whoever runs next


def test_dit_only_result_says_it_serves_load_wan_not_generate(dit_folder, tmp_path, capsys):
    dst = tmp_path / "ours"
    assert main(["convert", "--src", str(dit_folder), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"has no vae/, text_encoder/, tokenizer/: {dst} serves convert.load_wan" in out
    assert "not radial-jax generate" in out


def test_config_less_folder_of_unknown_width_names_what_is_missing(dit_folder, tmp_path, capsys):
    src = tmp_path / "transformer"
    src.mkdir()
    for f in (dit_folder / "transformer").glob("*.safetensors*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert "number of attention heads cannot be read from tensor shapes" in err and "no config.json" in err
    assert "dim=40 is no Wan2.1 size (1536: 12 heads, 5120: 40 heads)" in err and "\n" not in err
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("dim, heads", [(1536, 12), (5120, 40)])
def test_config_less_wan_sizes_get_their_head_count_and_the_rest_from_shapes(dim, heads):
    shapes = {"patch_embedding.weight": (dim, 16, 1, 2, 2),
              "condition_embedder.text_embedder.linear_1.weight": (dim, 4096),
              "condition_embedder.time_embedder.linear_1.weight": (dim, 256),
              "blocks.0.ffn.net.0.proj.weight": (8960, dim), "blocks.29.ffn.net.0.proj.weight": (8960, dim),
              "proj_out.weight": (64, dim)}  # fmt: skip
    config = wan.infer_config(wan_diffusers, shapes, None, "float32")
    assert (config.num_heads, config.dim, config.num_layers, config.ffn_dim) == (heads, dim, 30, 8960)
    assert (config.in_dim, config.out_dim, config.text_dim, config.model_type) == (16, 16, 4096, "t2v")


def test_no_blocks_is_named_not_a_zero_layer_model():
    with pytest.raises(CheckpointError, match="no blocks.N.. tensors"):
        wan.infer_config(wan_diffusers, {"patch_embedding.weight": (1536, 16, 1, 2, 2)}, None, "float32")


def test_non_empty_destination_is_refused_before_the_source_is_read(dit_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    monkeypatch.setattr(wan, "open_shards", lambda *a: pytest.fail("read the source first"))
    assert main(["convert", "--src", str(dit_folder), "--dst", str(tmp_path / "dst")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_missing_source_is_named(tmp_path, capsys):
    assert main(["convert", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err.strip() == f"radial-jax convert: error: --src {tmp_path / 'nope'} does not exist"
