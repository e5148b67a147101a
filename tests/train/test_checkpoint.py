"""train/checkpoint.py: the training state round-trips onto its shardings, keep-last-N, and a
process killed in the middle of a save leaves the previous checkpoint the newest usable one."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.checkpoint import Checkpoints

REPO = Path(__file__).resolve().parents[2]


def _state(seed: int, mesh=None):
    """A TrainState-shaped tree: LoRA-like and optimizer-like arrays, step, rng, data position."""
    keys = jax.random.split(jax.random.key(seed), 3)
    lora = {"blocks": {"0": {"q": {"lora_a": jax.random.normal(keys[0], (64, 4)),
                                   "lora_b": jax.random.normal(keys[1], (4, 64))}}}}
    if mesh is not None:
        lora = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.shape[0] == 64 else P(None, "x"))),
                            lora)
    return {"lora": lora, "opt_state": {"count": jnp.int32(seed), "mu": jax.tree.map(lambda x: 0.5 * x, lora)},
            "step": np.int64(seed), "rng": np.asarray(jax.random.key_data(keys[2])),
            "data": {"epoch": np.int64(1), "index": np.int64(seed)}}


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_state_round_trips_onto_the_templates_shardings(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(4, _state(4, mesh), {"run": {"steps": 9}})
    restored, config = checkpoints.restore(_state(0, mesh))
    _assert_same(restored, _state(4, mesh))
    assert config == {"run": {"steps": 9}}
    assert restored["lora"]["blocks"]["0"]["q"]["lora_a"].sharding.spec == P("x")


def test_keeps_the_newest_n(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, _state(step), {})
    assert checkpoints.all_steps() == [2, 3]
    _assert_same(checkpoints.restore(_state(0), step=2)[0], _state(2))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """A fresh process saves step 2, then dies inside the save of step 5 after its files are
    written but before orbax's finalize renames them into place."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from orbax.checkpoint._src.path import atomicity
        from test_checkpoint import _state
        from train.checkpoint import Checkpoints
        checkpoints = Checkpoints({str(tmp_path)!r}, keep=3)
        checkpoints.save(2, _state(2), {{"saved": 2}})
        def die(*args, **kwargs):
            os._exit(17)
        atomicity.AtomicRenameTemporaryPath.finalize = die
        checkpoints.save(5, _state(5), {{"saved": 5}})
    """)
    env = {"PATH": "/usr/bin:/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 17, done.stderr[-3000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and leftovers[0].startswith("5."), sorted(p.name for p in tmp_path.iterdir())
    checkpoints = Checkpoints(tmp_path, keep=3)
    assert checkpoints.latest_step() == 2
    restored, config = checkpoints.restore(_state(0))
    _assert_same(restored, _state(2))
    assert config == {"saved": 2}
    checkpoints.save(5, _state(5), {"saved": 5})  # the step can be saved again
    assert checkpoints.latest_step() == 5
