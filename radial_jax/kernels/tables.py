"""Compact index tables of a static block mask: what the kernels loop over.

Like splash attention's MaskInfo: for every query block, the count and the list of its key
blocks; for every key block (the backward's dk/dv pass), the count and the list of its query
blocks. Empty blocks cost nothing: a kernel never loads them.
"""

import dataclasses
import functools
import hashlib

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """Index tables of a block mask [QB, KB]; numpy int32, static at trace time.

    kv_ids: [QB, max(1, max_kv)] key blocks of each query block, ascending except that the
      ragged last key block (when seq_kv % block_size != 0) comes last, so a kernel masks keys
      past the end only in a row's final step; padding repeats the row's last id (or 0).
    kv_counts: [QB] how many entries of kv_ids are real.
    kv_full_counts: [QB] how many of them need no key mask (kv_counts minus 1 when the row
      holds the ragged block).
    q_ids, q_counts: the same for the transpose, [KB, max(1, max_q)] and [KB].
    """

    block_mask: np.ndarray
    block_size: int
    q_len: int
    kv_len: int
    kv_ids: np.ndarray
    kv_counts: np.ndarray
    kv_full_counts: np.ndarray
    q_ids: np.ndarray
    q_counts: np.ndarray

    @property
    def num_q_blocks(self) -> int:
        return self.block_mask.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.block_mask.shape[1]

    @property
    def kv_ragged(self) -> bool:
        return self.kv_len % self.block_size != 0


def block_tables(block_mask: np.ndarray, block_size: int, q_len: int, kv_len: int) -> BlockTables:
    """Returns the (cached) index tables of `block_mask` for the given lengths."""
    block_mask = np.ascontiguousarray(block_mask, dtype=bool)
    digest = hashlib.blake2b(np.packbits(block_mask).tobytes(), digest_size=16).hexdigest()
    return _cached_tables(digest, block_mask.shape, block_size, q_len, kv_len, _Payload(block_mask))


class _Payload:
    """Carries the mask into the cache without making it part of the key (the digest is)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Payload)


@functools.lru_cache(maxsize=64)
def _cached_tables(digest, shape, block_size, q_len, kv_len, payload) -> BlockTables:
    del digest, shape
    mask = payload.value.copy()
    mask.setflags(write=False)
    kv_ids, kv_counts = _row_lists(mask, ragged_last=kv_len % block_size != 0)
    q_ids, q_counts = _row_lists(mask.T, ragged_last=False)
    has_ragged = mask[:, -1] if kv_len % block_size else np.zeros(mask.shape[0], bool)
    tables = BlockTables(
        block_mask=mask, block_size=block_size, q_len=q_len, kv_len=kv_len,
        kv_ids=kv_ids, kv_counts=kv_counts,
        kv_full_counts=(kv_counts - has_ragged).astype(np.int32),
        q_ids=q_ids, q_counts=q_counts,
    )
    for a in (tables.kv_ids, tables.kv_counts, tables.kv_full_counts, tables.q_ids, tables.q_counts):
        a.setflags(write=False)
    return tables


def _row_lists(mask: np.ndarray, *, ragged_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Returns ([rows, width] int32 column ids per row, [rows] int32 counts) of a bool matrix."""
    rows, cols = mask.shape
    counts = mask.sum(axis=1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    # Sort keys: on columns first in ascending order; off columns after them.
    order_key = np.where(mask, np.arange(cols), cols + np.arange(cols))
    if ragged_last:
        order_key[:, -1] = np.where(mask[:, -1], cols - 0.5, order_key[:, -1])
    order = np.argsort(order_key, axis=1, kind="stable")[:, :width].astype(np.int32)
    last_real = order[np.arange(rows), np.maximum(counts - 1, 0)]
    pad = np.arange(width)[None, :] >= counts[:, None]
    ids = np.where(pad, np.where(counts[:, None] > 0, last_real[:, None], 0), order)
    return ids.astype(np.int32), counts


def packed_table(ids: np.ndarray, counts: np.ndarray):
    """Returns int32 [rows, 2^k]: per row (count, ids..., zero padding), one row per Triton program.

    ids: [rows, width] (kv_ids or q_ids), counts: [rows]. The width is a power of 2 because a
    Triton block's shape must be one.
    """
    width = 1 << ids.shape[1].bit_length()  # the next power of 2 >= 1 + ids' width
    table = jnp.zeros((ids.shape[0], width), jnp.int32).at[:, 0].set(jnp.asarray(counts))
    return table.at[:, 1 : 1 + ids.shape[1]].set(jnp.asarray(ids))
