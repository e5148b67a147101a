"""Training checkpoints: the whole training state as one orbax item, the config beside it.

    checkpoints = Checkpoints("runs/x/checkpoints", keep=3)
    checkpoints.save(step, state, config.to_dict())      # state: a TrainState pytree (below)
    state, saved_config = checkpoints.restore(template)   # template: the state a fresh run builds

A TrainState is {"lora": LoRA factors (nnx.State), "opt_state": the optax state, "step": int32,
"rng": the run's base PRNG key data, "data": {"epoch", "index"} of the next batch}: everything
an uninterrupted run would still hold, so a restored run continues bit for bit.

Atomicity is orbax's: a step is written into a temporary folder and renamed into place when
complete (finalize), so a crash mid-save leaves an unfinished temporary folder that is ignored
(and cleaned up on the next start), and the previous step stays the latest usable one.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """The checkpoints of one run folder, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            # Synchronous: LoRA state is megabytes, and a save that returns is a save on disk
            # (the NaN stop and the end of a run rely on that).
            enable_async_checkpointing=False,
        )  # fmt: skip
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Returns the newest finished step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Writes `state` and the config dict as step `step` (replacing nothing; old steps past
        `keep` are deleted only after this one is finalized)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(dict(config)))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def saved_config(self, step: int | None = None) -> dict:
        """Returns the config dict stored with `step` (default the newest) without reading the state."""
        step = self._step(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def restore(self, template: Mapping[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Returns (state, config dict) of `step` (default the newest), each array placed like the
        corresponding array of `template` (same tree; its shardings are used)."""
        step = self._step(step)
        abstract = jax.tree.map(_abstract, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()))  # fmt: skip
        return restored["state"], dict(restored["config"])

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        return step


def _abstract(x):
    """ShapeDtypeStruct of an array with its sharding (numpy and Python scalars: on the host)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.asarray(x)
