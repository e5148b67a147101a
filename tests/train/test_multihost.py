"""`radial-jax train` on two processes (jax.distributed on the CPU, gloo collectives), 4 CPU
devices each: a global mesh over both trains the same LoRA, with the same losses, as one process
on 8 devices. Both processes write and restore the orbax checkpoints; process 0 alone writes the
logs and the exported LoRA and prints."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train.cache_testing import random_cache
from train.checkpoint import Checkpoints
from train.config import load_config
from train.logging import read_csv
from train.loop import model_config, train

REPO = Path(__file__).resolve().parents[2]
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 300  # a hung collective (one process died) must fail the test, not the suite
# 9 frames at 64x64: latents 3 x 8 x 8 (48 tokens); 5 samples in batches of 2: step 3 starts the
# second epoch (the data order crosses it).
SETTINGS = ["data.frames=9", "data.height=64", "data.width=64", "data.batch_size=2", "run.steps=3",
            "run.save_every=2", "run.log_every=1", "optim.warmup_steps=1", "run.mesh=data=2,fsdp=4", "sample.every=0"]  # fmt: skip
# Added on resuming (the sample section may change then): a 5-frame 32x48 video at the last step,
# one step without guidance on the first cached caption's context (no text encoder; the DiT once).
SAMPLE = ["sample.every=10", "sample.steps=1", "sample.guidance=1.0", 'sample.prompt=""', "sample.frames=5",
          "sample.height=32", "sample.width=48"]  # fmt: skip


# gloo prints "[Gloo] Rank 3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3"
# from several threads, and their writes interleave even within words, so process 1's output cannot be
# cleaned of them reliably. What is checked instead: none of process 0's own lines appear in it.
# The words of gloo's connection message, which every process prints from several threads at once
_GLOO_WORDS = frozenset("[Gloo] Rank is connected to peer ranks. Expected number of connected ranks is :".split())


def _own_lines(stdout: str) -> list[str]:
    """The lines a process printed with a word that is not gloo's: its threads' messages interleave and
    can leave a fragment such as "1" on a line of its own (a line of ours in both processes' output
    otherwise, on CI once)."""
    return [line.strip() for line in stdout.splitlines()
            if any(not word.isdigit() and word not in _GLOO_WORDS for word in line.split())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(overrides: list[str], *flags: str) -> list[subprocess.CompletedProcess]:
    """Runs `radial-jax train` as PROCESSES processes of one jax.distributed job; returns them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"}  # fmt: skip
    coordinator = f"localhost:{_free_port()}"
    sets = [arg for o in overrides for arg in ("--set", o)]
    procs = [subprocess.Popen([sys.executable, "-m", "radial_jax.cli", "train", "--config", "tiny", "--no-progress", *sets, *flags,
                               "--coordinator", coordinator, "--num-processes", str(PROCESSES), "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(PROCESSES)]  # fmt: skip
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, d in enumerate(done):
        assert d.returncode == 0, f"process {i}:\n{d.stdout[-2000:]}\n{d.stderr[-4000:]}"
    return done


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # subprocess and imageio's ffmpeg child
def test_two_processes_train_like_one_process_on_eight_devices(tmp_path):
    """Steps 1-2 on data=2 x fsdp=4 (each process reads its own row of the batch), a checkpoint
    saved by both, then a fresh pair of processes resuming on fsdp=8 (the batch replicated: each
    reads both rows) for step 3 and a sample video: the losses and LoRA of one process's
    uninterrupted run."""
    arch = model_config(load_config("tiny"))
    cache = random_cache(tmp_path / "cache", 5, (3, 8, 8, arch.in_dim), context_dim=arch.text_dim,
                         text_len=arch.text_len, frames=9, height=64, width=64)  # fmt: skip
    common = [*SETTINGS, f"data.cache={cache}"]
    single = train(load_config("tiny", [*common, f"run.out={tmp_path / 'one'}"]), progress=False,
                   devices=jax.devices()[:8])  # fmt: skip
    assert jax.process_count() == 1 and sorted(single.losses) == [1, 2, 3]

    two = [*common, f"run.out={tmp_path / 'two'}"]
    stopped = _launch(two, "--stop-at", "2")
    assert Checkpoints(tmp_path / "two" / "checkpoints").all_steps() == [2]
    resumed = _launch([*two, *SAMPLE], "--resume", "--mesh", "fsdp=8")
    for procs, said in ((stopped, "stopped at --stop-at 2"), (resumed, "step 3 of 3")):
        # process 0 alone prints (gloo's connection messages, in both, are not ours)
        ours = _own_lines(procs[0].stdout)
        assert any(said in line for line in ours) and len(ours) >= 2, procs[0].stdout
        assert not [line for line in ours if line in procs[1].stdout], procs[1].stdout
    rows = read_csv(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by process 0
    np.testing.assert_allclose([r["loss"] for r in rows], [single.losses[s] for s in (1, 2, 3)], rtol=2e-5)
    assert Checkpoints(tmp_path / "two" / "checkpoints").all_steps() == [2, 3]
    # The sample of the last step: the DiT run by both processes, decoded and written by process 0.
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step-000003.mp4"]
    assert np.stack(imageio.mimread(tmp_path / "two" / "samples" / "step-000003.mp4")).shape == (5, 32, 48, 3)

    one, two = load_file(single.lora_path), load_file(tmp_path / "two" / "lora.safetensors")
    assert one.keys() == two.keys() and len(one) == 2 * 4 * 2  # A and B of q, k, v, o in 2 blocks
    moved = max(float(np.abs(t).max()) for n, t in one.items() if "lora_B" in n)
    assert moved > 1e-3  # B trained away from zero
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-3, atol=1e-5 * moved, err_msg=name)
