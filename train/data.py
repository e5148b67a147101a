"""The training side of the latent cache (`radial-jax prepare`, train/cache.py): batches in a
deterministic order with a position that resumes exactly.

    dataset = LatentDataset("cache/")                     # reads manifest.json; refuses an empty or unfinished cache
    dataset.check(latent_shape=(21, 60, 104, 16), context_dim=4096, text_len=512)   # one clear error, before compiling
    for batch, position in dataset.batches(batch_size=8, seed=0, start=DataPosition()):
        batch["latents"]   # float32 numpy [B, F, H, W, C]   Wan-normalised VAE latents
        batch["context"]   # float32 numpy [B, text_len, D]  umT5 context, zero beyond each caption
        save(..., position.to_dict())                     # the position of the *next* batch

Order: epoch e visits the samples in np.random.default_rng([seed, e]).permutation(n), in batches
of batch_size; the last n % batch_size samples of an epoch are left out (static shapes: one
compiled step), a different few each epoch. The iterator is endless (epoch after epoch).
DataPosition(epoch, index) counts the batches taken in that epoch; batches(start=p) yields
exactly what an uninterrupted run yields after p, whatever process or machine it runs on.
Multi-host: each process passes `rows`, the rows of every global batch its devices hold
(train/step.py's process_rows: a contiguous range, disjoint between processes when the batch is
split over them, the whole batch when it is replicated), for jax.make_array_from_process_local_data.
"""

import dataclasses
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from train.cache import FORMAT, MANIFEST


class CacheError(ValueError):
    """A latent cache that is missing, empty, unfinished or does not fit the training config."""


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: `index` batches of epoch `epoch` have been taken."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, value) -> "DataPosition":
        """From to_dict's output (ints or 0-d arrays, as a checkpoint restores them)."""
        return cls(int(value["epoch"]), int(value["index"]))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Returns int [num_samples]: the sample order of `epoch`, fixed by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class LatentDataset:
    """A finished latent cache: manifest.json and its samples/*.safetensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CacheError(f"{self.root}: no {MANIFEST}; make a cache first: radial-jax prepare VIDEOS --out "
                             f"{self.root}")  # fmt: skip
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{path}: not a radial-jax latent cache (format {manifest.get('format')!r})")
        if not manifest.get("complete"):
            raise CacheError(f"{self.root}: unfinished (radial-jax prepare was interrupted); run the same prepare "
                             "command again to finish it")  # fmt: skip
        if not manifest["samples"]:
            raise CacheError(f"{self.root}: the cache holds no samples ({len(manifest.get('skipped', []))} videos "
                             "were skipped; see manifest.json)")  # fmt: skip
        self.manifest = manifest
        self.samples: list[dict] = manifest["samples"]
        self.latent_shape: tuple[int, ...] = tuple(manifest["latent_shape"])
        self.context_dim: int = manifest["context_dim"]
        self.text_len: int = manifest["text_len"]

    def __len__(self) -> int:
        return len(self.samples)

    def check(self, *, latent_shape: Sequence[int] | None = None, context_dim: int | None = None,
              text_len: int | None = None) -> None:  # fmt: skip
        """Raises CacheError (one line) unless the cache's latents are [F, H, W, C] = latent_shape,
        its contexts context_dim wide and no caption longer than text_len tokens."""
        problems = []
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            config = self.manifest["config"]
            problems.append(f"latents {list(self.latent_shape)} [F, H, W, C] (prepared at {config['width']}x"
                            f"{config['height']}, {config['frames']} frames) but the training config needs "
                            f"{list(latent_shape)}")  # fmt: skip
        if context_dim is not None and context_dim != self.context_dim:
            problems.append(f"text context width {self.context_dim} but the model's text_dim is {context_dim} "
                            "(prepared with other encoders?)")  # fmt: skip
        longest = max(s["text_tokens"] for s in self.samples)
        if text_len is not None and longest > text_len:
            problems.append(f"a caption of {longest} tokens but the model's text_len is {text_len}")
        if problems:
            raise CacheError(f"cache {self.root} does not fit: " + "; ".join(problems)
                             + "; run radial-jax prepare with matching --size/--frames/--ckpt")  # fmt: skip

    def load(self, index: int, text_len: int | None = None) -> dict[str, np.ndarray]:
        """Returns sample `index` (manifest order): latents float32 [F, H, W, C], context float32
        [text_len, D] zero-padded (default: the cache's text_len)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        sample = self.samples[index]
        try:
            tensors = load_file(str(self.root / sample["file"]))
        except (OSError, SafetensorError) as e:
            raise CacheError(f"{self.root / sample['file']}: unreadable ({e}); run radial-jax prepare again") from None
        text_len = self.text_len if text_len is None else text_len
        context = np.zeros((text_len, self.context_dim), np.float32)
        context[: tensors["context"].shape[0]] = tensors["context"][:text_len]
        return {"latents": tensors["latents"], "context": context}

    def batches(
        self, batch_size: int, *, seed: int, start: DataPosition = DataPosition(), text_len: int | None = None,
        rows: slice = slice(None), prefetch: int = 2,
    ) -> Iterator[tuple[dict[str, np.ndarray], DataPosition]]:
        """Yields (batch, position after it) forever from `start` (see the module docstring).

        batch_size: global rows a step; rows: the ones this process reads (default all).
        prefetch: batches read ahead on a background thread (0: none).
        """
        if batch_size < 1 or batch_size > len(self):
            raise CacheError(f"batch_size {batch_size} must be between 1 and the cache's {len(self)} samples")
        if start.epoch < 0 or not 0 <= start.index < self.batches_per_epoch(batch_size):
            raise CacheError(f"data position {start} is outside this cache ({self.batches_per_epoch(batch_size)} "
                             "batches an epoch); was the checkpoint trained on another cache?")  # fmt: skip
        stream = self._stream(batch_size, seed, start, text_len, rows)
        return _prefetched(stream, prefetch) if prefetch > 0 else stream

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def _stream(self, batch_size, seed, start, text_len, rows):
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, index = start.epoch, start.index
        while True:
            order = epoch_order(len(self), seed, epoch)
            for index in range(index, per_epoch):
                picked = order[index * batch_size : (index + 1) * batch_size][rows]
                loaded = [self.load(int(i), text_len) for i in picked]
                batch = {key: np.stack([s[key] for s in loaded]) for key in ("latents", "context")}
                after = DataPosition(epoch, index + 1) if index + 1 < per_epoch else DataPosition(epoch + 1, 0)
                yield batch, after
            epoch, index = epoch + 1, 0


def _prefetched(stream: Iterator, size: int) -> Iterator:
    """Runs `stream` on a daemon thread, `size` items ahead; re-raises its error in the caller.
    The thread stops once the consumer drops (closes) this generator."""
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for item in stream:
                if not put(("item", item)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))

    threading.Thread(target=fill, daemon=True).start()
    try:
        while True:
            kind, value = items.get()
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
