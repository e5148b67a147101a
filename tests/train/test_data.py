"""The training reader (train/data.py) over a hand-built cache: order fixed by (seed, epoch),
every epoch a permutation, the position restores the exact stream, shards per process, and
a cache that does not fit is one clear error."""

import itertools
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from train.cache import FORMAT
from train.data import CacheError, DataPosition, LatentDataset, epoch_order

LATENT = (2, 3, 4, 5)  # F, H, W, C
DIM, TEXT_LEN = 6, 8


def _cache(root, num_samples: int, *, complete: bool = True):
    """Writes a cache whose sample i has latents all equal to i and a context of i % 5 + 1 rows of i."""
    (root / "samples").mkdir(parents=True)
    samples = []
    for i in range(num_samples):
        tokens = i % 5 + 1
        file = f"samples/s{i}.safetensors"
        save_file({"latents": np.full(LATENT, i, np.float32), "context": np.full((tokens, DIM), i, np.float32)},
                  str(root / file))  # fmt: skip
        samples.append({"id": f"s{i}", "file": file, "text_tokens": tokens})
    manifest = {"format": FORMAT, "version": 1, "complete": complete, "latent_shape": list(LATENT),
                "context_dim": DIM, "text_len": TEXT_LEN, "samples": samples, "skipped": [],
                "config": {"width": 32, "height": 24, "frames": 5}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _ids(batch) -> list[int]:
    return [int(x) for x in batch["latents"][:, 0, 0, 0, 0]]


def _take(stream, n):
    return [(_ids(batch), position) for batch, position in itertools.islice(stream, n)]


def test_each_epoch_is_a_seeded_permutation_without_the_remainder(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 10))
    taken = _take(dataset.batches(3, seed=7, prefetch=0), 9)  # 3 batches an epoch, 1 sample left out
    for epoch in range(3):
        ids = sum((ids for ids, _ in taken[3 * epoch : 3 * epoch + 3]), [])
        assert ids == epoch_order(10, 7, epoch)[:9].tolist()
        assert len(set(ids)) == 9
    assert [p for _, p in taken[:4]] == [DataPosition(0, 1), DataPosition(0, 2), DataPosition(1, 0), DataPosition(1, 1)]
    assert epoch_order(10, 7, 0).tolist() != epoch_order(10, 7, 1).tolist()
    assert epoch_order(10, 7, 0).tolist() != epoch_order(10, 8, 0).tolist()
    assert taken == _take(dataset.batches(3, seed=7, prefetch=2), 9)  # the reading thread changes nothing


def test_restored_position_continues_the_uninterrupted_stream(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 10))
    straight = _take(dataset.batches(4, seed=1), 8)
    for stop in (1, 2, 5):  # mid-epoch, at an epoch boundary (2 batches an epoch), later
        saved = json.loads(json.dumps(straight[stop - 1][1].to_dict()))  # as a checkpoint would keep it
        resumed = _take(LatentDataset(tmp_path).batches(4, seed=1, start=DataPosition.from_dict(saved)), 8 - stop)
        assert resumed == straight[stop:]


def test_processes_get_their_rows_of_the_global_batch(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 12))
    whole = _take(dataset.batches(4, seed=3), 5)
    parts = [_take(dataset.batches(4, seed=3, rows=rows), 5) for rows in (slice(0, 2), slice(2, 4))]
    for step in range(5):
        assert parts[0][step][0] + parts[1][step][0] == whole[step][0]
        assert parts[0][step][1] == parts[1][step][1] == whole[step][1]


def test_batch_contexts_are_zero_padded_to_text_len(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 6))
    batch, _ = next(dataset.batches(6, seed=0, text_len=10))
    assert batch["latents"].shape == (6, *LATENT) and batch["latents"].dtype == np.float32
    assert batch["context"].shape == (6, 10, DIM)
    for row, i in enumerate(_ids(batch)):
        tokens = i % 5 + 1
        assert np.all(batch["context"][row, :tokens] == i) and np.all(batch["context"][row, tokens:] == 0)


def test_check_names_what_does_not_fit(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 6))
    dataset.check(latent_shape=LATENT, context_dim=DIM, text_len=TEXT_LEN)
    with pytest.raises(CacheError, match=r"latents \[2, 3, 4, 5\] .*prepared at 32x24, 5 frames.* needs \[3, 3, 4, 5\]"):
        dataset.check(latent_shape=(3, 3, 4, 5))
    with pytest.raises(CacheError, match="text_dim is 7"):
        dataset.check(context_dim=7)
    with pytest.raises(CacheError, match="a caption of 5 tokens but the model's text_len is 4"):
        dataset.check(text_len=4)


def test_unusable_caches_are_refused(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json; make a cache first"):
        LatentDataset(tmp_path / "none")
    with pytest.raises(CacheError, match="holds no samples"):
        LatentDataset(_cache(tmp_path / "empty", 0))
    with pytest.raises(CacheError, match="unfinished"):
        LatentDataset(_cache(tmp_path / "partial", 3, complete=False))
    dataset = LatentDataset(_cache(tmp_path / "small", 3))
    with pytest.raises(CacheError, match="batch_size 4 must be between 1 and the cache's 3 samples"):
        dataset.batches(4, seed=0)
    with pytest.raises(CacheError, match="outside this cache"):
        dataset.batches(2, seed=0, start=DataPosition(0, 1))  # 1 batch an epoch: index 1 cannot be


def test_a_damaged_sample_file_is_a_clear_error(tmp_path):
    dataset = LatentDataset(_cache(tmp_path, 2))
    (tmp_path / "samples" / "s1.safetensors").write_bytes(b"\x01")
    with pytest.raises(CacheError, match="s1.safetensors: unreadable"):
        dataset.load(1)
