"""The radial block mask against a token-level transcription of the reference's rule."""

import math

import numpy as np
import pytest

from radial_jax import mask as mask_lib
from radial_jax.mask import radial_block_mask


def _reference_rule(num_frames, s, block_size, decay_factor, model, extra_tokens=0):
    """Token-level transcription of gen_log_mask_shrinked (float32 tests as torch does them).

    Differs from the reference only where it crashes: a ceil(N'/B) grid with tiles clipped at
    its edge; then rows left empty get their diagonal block.
    """
    b = block_size
    video = num_frames * s
    grid = math.ceil((video + extra_tokens) / b)
    final = np.zeros((grid, grid), bool)
    if extra_tokens:
        final[video // b :] = True
        final[:, video // b :] = True
    rows = np.arange(s)[:, None]
    cols = np.arange(s)[None, :]
    for i in range(num_frames):
        for j in range(num_frames):
            d = abs(i - j)
            if j == 0 and model == "wan":
                local = np.ones((s, s), bool)
            else:
                if d <= 1:
                    width = s
                else:
                    width = 2 ** s.bit_length() / 2 ** d.bit_length() * decay_factor
                    width = width if width >= b else b
                local = np.abs(cols - rows).astype(np.float32) <= np.float32(width)
                split = 2 ** s.bit_length() / 2 ** d.bit_length()
                if split < 128 and d % int(128 / split) != 0:
                    local[:] = False
            rr, rc = (i * s) % b, (j * s) % b
            nb = (s - 1) // b + 1
            padded = np.zeros((rr + nb * b, rc + nb * b), bool)
            padded[rr : rr + s, rc : rc + s] = local
            tile = padded[: nb * b, : nb * b].reshape(nb, b, nb, b)
            col_density = tile.sum(axis=1).astype(np.float32) / np.float32(b)
            nonzero = (col_density > 0).sum(-1).astype(np.float32)
            high = (col_density > np.float32(1 / 3)).sum(-1).astype(np.float32)
            block = high / (nonzero + np.float32(1e-9)) > np.float32(0.6)
            r0, c0 = (i * s) // b, (j * s) // b
            h, w = min(nb, grid - r0), min(nb, grid - c0)
            final[r0 : r0 + h, c0 : c0 + w] |= block[:h, :w]
    empty = np.flatnonzero(~final.any(1))
    final[empty, empty] = True
    return final


CASES = [
    # (frames, tokens_per_frame, block, decay, model, extra)
    (6, 256, 128, 1.0, "wan", 0),
    (9, 300, 128, 1.0, "wan", 0),  # ragged: 2700 tokens
    (9, 300, 64, 0.5, "wan", 0),
    (12, 200, 64, 1.0, "hunyuan", 0),
    (12, 200, 64, 0.2, "wan", 0),
    (7, 520, 128, 0.2, "hunyuan", 100),  # text tokens after the video
    (17, 130, 128, 1.0, "wan", 0),  # frames barely larger than a block
    (5, 40, 64, 1.0, "wan", 0),  # frames smaller than a block: empty rows, diagonal fallback
    (33, 96, 64, 1.0, "hunyuan", 7),
]


@pytest.mark.parametrize("frames,s,block,decay,model,extra", CASES)
def test_block_mask_equals_token_level_reference_rule(frames, s, block, decay, model, extra):
    expected = _reference_rule(frames, s, block, decay, model, extra)
    got = radial_block_mask(frames, s, block_size=block, decay_factor=decay, model=model, extra_tokens=extra)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "frames,s,decay,density",
    [(21, 1560, 1.0, 0.444), (21, 3600, 1.0, 0.396), (21, 3600, 0.2, 0.262), (41, 1560, 1.0, 0.296)],
)
def test_block_density_matches_the_reference_at_wan_sizes(frames, s, decay, density):
    block_mask = radial_block_mask(frames, s, decay_factor=decay)
    assert block_mask.shape == (math.ceil(frames * s / 128),) * 2
    assert abs(mask_lib.block_density(block_mask) - density) < 5e-4


def test_every_row_has_a_block_and_the_diagonal_is_on():
    for frames, s, block in [(41, 3600, 128), (5, 40, 64), (11, 1560, 128), (9, 100, 64)]:
        m = radial_block_mask(frames, s, block_size=block)
        assert m.any(axis=1).all()
        assert np.diagonal(m).all()


def test_ragged_last_row_at_720p_161f_gets_only_its_diagonal():
    # 41 x 3600 = 147,600 = 1153 * 128 + 16: the reference's rule leaves the last 16 tokens empty.
    m = radial_block_mask(41, 3600)
    assert m.shape == (1154, 1154)
    assert np.flatnonzero(m[-1]).tolist() == [1153]


def test_wan_frame0_columns_are_a_sink():
    s, b = 256, 128
    m = radial_block_mask(10, s, block_size=b, model="wan")
    assert m[:, : s // b].all()
    h = radial_block_mask(10, s, block_size=b, model="hunyuan")
    assert not h[:, : s // b].all()


def test_block_aligned_mask_is_symmetric():
    # With frames aligned to blocks every pair tile is symmetric and the pair rule is symmetric
    # in (i, j) except for the wan sink column.
    m = radial_block_mask(16, 512, model="hunyuan")
    np.testing.assert_array_equal(m, m.T)


def test_nnz_grows_like_n_log_n():
    # Doubling the frames multiplies nnz by 2 (1 + 1/log2 n) + lower-order terms for N log N
    # growth, by 4 for dense: the doubling factor must fall towards 2, and nnz / (n log2 n)
    # must level off (its increments shrink).
    nnz, per_nlogn = [], []
    for frames in (16, 32, 64, 128, 256):
        m = radial_block_mask(frames, 1024, model="hunyuan")
        n = m.shape[0]
        nnz.append(int(m.sum()))
        per_nlogn.append(nnz[-1] / (n * math.log2(n)))
    doubling = np.array(nnz[1:]) / np.array(nnz[:-1])
    assert (np.diff(doubling) < 0).all() and doubling.max() < 3.0 and doubling[-1] < 2.5, doubling
    assert (np.diff(np.diff(per_nlogn)) < 0).all(), per_nlogn


def test_token_mask_expands_the_block_mask():
    tm = mask_lib.radial_token_mask(6, 100, block_size=64)
    bm = radial_block_mask(6, 100, block_size=64)
    assert tm.shape == (600, 600)
    np.testing.assert_array_equal(tm[::64, ::64], bm)
    assert tm.sum() == mask_lib.computed_token_pairs(bm, 64, 600, 600)


def test_flops_count_ragged_edges_exactly():
    bm = np.ones((3, 2), bool)
    assert mask_lib.computed_token_pairs(bm, 128, 300, 200) == 300 * 200
    assert mask_lib.attention_flops(10, heads=2, head_dim=64, batch=3) == 4 * 10 * 2 * 64 * 3


def test_mask_is_fast_at_720p_321_frames():
    import time

    start = time.perf_counter()
    radial_block_mask(81, 3600)
    assert time.perf_counter() - start < 3.0  # < 1 s on a desktop core; CI machines are slower


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(model="cogvideo"), "model"),
        (dict(block_size=100), "block_size"),
        (dict(decay_factor=0.0), "decay_factor"),
        (dict(extra_tokens=-1), "extra_tokens"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        radial_block_mask(4, 256, **kwargs)


def test_video_tokens_geometry():
    g = mask_lib.video_tokens(81, 720, 1280)
    assert (g.num_frames, g.tokens_per_frame, g.num_tokens) == (21, 3600, 75600)
    with pytest.raises(ValueError, match="4k\\+1"):
        mask_lib.video_tokens(80, 720, 1280)
    with pytest.raises(ValueError, match="multiples of 16"):
        mask_lib.video_tokens(81, 721, 1280)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    frames=st.integers(1, 12),
    s=st.integers(8, 400),
    block=st.sampled_from([64, 128]),
    decay=st.sampled_from([0.2, 0.5, 1.0, 2.0]),
    model=st.sampled_from(["wan", "hunyuan"]),
    extra=st.sampled_from([0, 0, 50]),
)
def test_block_mask_equals_reference_rule_on_random_geometries(frames, s, block, decay, model, extra):
    expected = _reference_rule(frames, s, block, decay, model, extra)
    got = radial_block_mask(frames, s, block_size=block, decay_factor=decay, model=model, extra_tokens=extra)
    np.testing.assert_array_equal(got, expected)
