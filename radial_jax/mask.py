"""The radial block mask of Radial Attention (arXiv 2506.19852), bit for bit the reference's.

The reference (mit-han-lab/radial-attention, radial_attn/attn_mask.py, `gen_log_mask_shrinked`)
builds, for every pair of latent frames (i, j), an s x s token mask (s = tokens per frame),
pads it into a tile of ceil(s/B) x ceil(s/B) blocks at the frame's in-block offset, reduces
the tile to blocks with a column-density rule and ORs it into the final block mask. We compute
the same thing in closed form: the number of "on" rows of a banded token mask inside a block
is an interval length, so no token-level array is ever built (milliseconds at 81 x 3600 tokens).

Deviations from the reference, all where the reference crashes or leaves a token attending to
nothing:
- Ragged N (not a multiple of B): the grid has ceil(N'/B) blocks and per-pair tiles are
  clipped at its edge (the reference's grid has N'//B blocks and crashes on the tile write).
- A query-block row left with no key block (possible only when frames or the sequence end
  are not block-aligned) gets its diagonal block, so every token attends to something.
"""

import dataclasses
import functools

import numpy as np

DIAGONAL_SPLIT_THRESHOLD = 128  # tokens; fixed in the reference, independent of block_size
MODELS = ("wan", "hunyuan")

# Wan2.1 and HunyuanVideo both downsample video by a 4x8x8 VAE and patchify by 1x2x2.
VAE_TEMPORAL = 4
VAE_SPATIAL = 8
PATCH_SPATIAL = 2


@dataclasses.dataclass(frozen=True)
class VideoTokens:
    """Token geometry of a video in a DiT: frame-major, tokens_per_frame tokens per latent frame."""

    num_frames: int
    tokens_per_frame: int

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


def video_tokens(frames: int, height: int, width: int) -> VideoTokens:
    """Returns the latent token geometry of a `frames` x `height` x `width` pixel video (Wan, Hunyuan)."""
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"frames={frames} must be 4k+1 (e.g. 81, 161)")
    unit = VAE_SPATIAL * PATCH_SPATIAL
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise ValueError(f"height={height} and width={width} must be positive multiples of {unit}")
    return VideoTokens(1 + (frames - 1) // VAE_TEMPORAL, (height // unit) * (width // unit))


def _pair_window(i: int, j: int, s: int, block_size: int, decay_factor: float, model: str) -> int:
    """Returns the band half-width (in tokens) of frame pair (i, j): -1 if dropped, >= s if full."""
    if model == "wan" and j == 0:  # frame 0 is an attention sink for every frame
        return s
    d = abs(i - j)
    group = d.bit_length()
    # The "diagonal split": far frame pairs are kept only every int(128 / L) frames.
    split_length = 2 ** s.bit_length() / 2**group
    if split_length < DIAGONAL_SPLIT_THRESHOLD and d % int(DIAGONAL_SPLIT_THRESHOLD / split_length):
        return -1
    if d <= 1:
        return s
    width = 2 ** s.bit_length() / 2**group * decay_factor
    width = width if width >= block_size else block_size
    # The reference compares int64 distances with a Python float, which torch evaluates in
    # float32; flooring the float32 value gives the same integer half-width.
    return min(int(np.floor(np.float32(width))), s)


@functools.lru_cache(maxsize=4096)
def _tile(s: int, block_size: int, row_offset: int, col_offset: int, window: int) -> np.ndarray:
    """Returns the [nb, nb] block tile of a banded s x s token mask placed at in-block offsets.

    Token row r of the frame sits at tile row row_offset + r, token column c at col_offset + c;
    the tile is nb = ceil(s / B) blocks square, and tokens beyond it are dropped (as in the
    reference). A block is on iff (#columns with > B/3 rows on) / (#columns with a row on) > 0.6.
    """
    b = block_size
    nb = -(-s // b)
    tile_cols = np.arange(nb * b).reshape(nb, b) - col_offset  # token column of each tile column
    row_lo = np.clip(np.arange(nb) * b - row_offset, 0, s)  # token rows [row_lo, row_hi) per block row
    row_hi = np.clip(np.arange(1, nb + 1) * b - row_offset, 0, s)
    # Rows r in [row_lo, row_hi) with |c - r| <= window: an interval intersection.
    lo = np.maximum(row_lo[:, None, None], tile_cols[None] - window)
    hi = np.minimum(row_hi[:, None, None], tile_cols[None] + window + 1)
    valid_col = (tile_cols >= 0) & (tile_cols < s)
    counts = np.where(valid_col[None], np.maximum(hi - lo, 0), 0)  # [nb rows, nb cols, B]
    # Integer forms of the reference's float tests `count / B > 1/3` and `hi / nz > 0.6`.
    dense_cols = (3 * counts > b).sum(-1)
    nonzero_cols = (counts > 0).sum(-1)
    tile = 5 * dense_cols > 3 * nonzero_cols
    tile.setflags(write=False)
    return tile


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    extra_tokens: int = 0,
) -> np.ndarray:
    """Returns the radial block mask: numpy bool [ceil(N'/B), ceil(N'/B)], N' = F*s + extra_tokens.

    num_frames: latent frames F; tokens_per_frame: s (video tokens are frame-major);
    block_size: B tokens per block; decay_factor: scales the spatial windows of far frames;
    model: "wan" (frame 0 is a sink) or "hunyuan"; extra_tokens: tokens after the video
    (HunyuanVideo's text), which attend to and are attended by everything.
    """
    _check_args(num_frames, tokens_per_frame, block_size, decay_factor, model, extra_tokens)
    s, b = tokens_per_frame, block_size
    video = num_frames * s
    grid = -(-(video + extra_tokens) // b)
    mask = np.zeros((grid, grid), dtype=bool)
    if extra_tokens:
        mask[video // b :] = True
        mask[:, video // b :] = True
    for i in range(num_frames):
        for j in range(num_frames):
            window = _pair_window(i, j, s, b, decay_factor, model)
            if window < 0:
                continue
            tile = _tile(s, b, (i * s) % b, (j * s) % b, window)
            r0, c0 = (i * s) // b, (j * s) // b
            rows, cols = min(tile.shape[0], grid - r0), min(tile.shape[1], grid - c0)
            mask[r0 : r0 + rows, c0 : c0 + cols] |= tile[:rows, :cols]
    return with_diagonal_fallback(mask)


def with_diagonal_fallback(block_mask: np.ndarray) -> np.ndarray:
    """Returns the square mask with the diagonal block turned on in rows that have no block."""
    empty = ~block_mask.any(axis=1)
    if empty.any():
        block_mask = block_mask.copy()
        idx = np.flatnonzero(empty)
        block_mask[idx, idx] = True
    return block_mask


def radial_token_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    extra_tokens: int = 0,
) -> np.ndarray:
    """Returns the token-level mask [N', N'] that the block mask implies (small sizes only)."""
    block_mask = radial_block_mask(
        num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
        model=model, extra_tokens=extra_tokens,
    )
    n = num_frames * tokens_per_frame + extra_tokens
    if n > 32768:
        raise ValueError(f"radial_token_mask builds an N x N array; N={n} is too large (max 32768)")
    return expand_block_mask(block_mask, block_size, n, n)


def expand_block_mask(block_mask: np.ndarray, block_size: int, q_len: int, kv_len: int) -> np.ndarray:
    """Returns the token mask [q_len, kv_len] of a block mask [ceil(q_len/B), ceil(kv_len/B)]."""
    q_blocks = np.arange(q_len) // block_size
    kv_blocks = np.arange(kv_len) // block_size
    return block_mask[q_blocks[:, None], kv_blocks[None, :]]


def block_density(block_mask: np.ndarray) -> float:
    """Returns the fraction of blocks that are on."""
    return float(block_mask.mean())


def computed_token_pairs(block_mask: np.ndarray, block_size: int, q_len: int, kv_len: int) -> int:
    """Returns how many (query, key) token pairs the on blocks cover, ragged edge blocks counted exactly."""
    rows = np.minimum(block_size, q_len - np.arange(block_mask.shape[0]) * block_size)
    cols = np.minimum(block_size, kv_len - np.arange(block_mask.shape[1]) * block_size)
    return int(rows @ block_mask.astype(np.int64) @ cols)


def attention_flops(token_pairs: int, *, heads: int, head_dim: int, batch: int = 1) -> int:
    """Returns forward FLOPs of attention over `token_pairs` pairs: 2 matmuls x 2 FLOPs per MAC."""
    return 4 * token_pairs * heads * head_dim * batch


def _check_args(num_frames, tokens_per_frame, block_size, decay_factor, model, extra_tokens):
    if model not in MODELS:
        raise ValueError(f"model={model!r} must be one of {MODELS}")
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(f"num_frames={num_frames} and tokens_per_frame={tokens_per_frame} must be >= 1")
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size={block_size} must be a positive multiple of 16 (the reference uses 64 or 128)")
    if not decay_factor > 0:
        raise ValueError(f"decay_factor={decay_factor} must be > 0")
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens={extra_tokens} must be >= 0")
