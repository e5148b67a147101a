"""The attention API and its jnp reference against float64 numpy and jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax.attention import check_inputs
from radial_jax import attention_reference, expand_block_mask, radial_attention, radial_block_mask


def _qkv(key, batch, q_len, kv_len, heads, head_dim, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, kv_len, heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, kv_len, heads, head_dim), dtype)
    return q, k, v


def float64_masked_attention(q, k, v, token_mask, scale=None):
    """Returns (out, lse) in float64 numpy; rows with no key give zeros and -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("blnd,bmnd->bnlm", q, k) * scale
    logits = np.where(token_mask, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    probs = np.exp(logits - row_max)
    total = probs.sum(-1, keepdims=True)
    out = np.einsum("bnlm,bmnd->blnd", probs / np.where(total > 0, total, 1.0), v)
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + row_max)[..., 0]
    return out, lse


def test_reference_all_on_equals_jax_nn():
    q, k, v = _qkv(jax.random.key(0), 2, 300, 300, 3, 64)
    mask = np.ones((3, 3), bool)
    out = radial_attention(q, k, v, block_mask=mask, implementation="reference")
    expected = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("q_len,kv_len,block", [(600, 600, 64), (1000, 1000, 128), (200, 520, 64)])
def test_reference_radial_equals_float64_masked_softmax(q_len, kv_len, block):
    rng = np.random.default_rng(q_len)
    if q_len == kv_len:
        mask = radial_block_mask(q_len // 100, 100, block_size=block)
    else:
        mask = rng.random((-(-q_len // block), -(-kv_len // block))) < 0.4
        mask[1] = False  # an empty row
    q, k, v = _qkv(jax.random.key(1), 2, q_len, kv_len, 2, 32)
    out, lse = attention_reference(q, k, v, mask, block_size=block, chunk_tokens=2 * block)
    token_mask = expand_block_mask(mask, block, q_len, kv_len)
    expected, expected_lse = float64_masked_attention(q, k, v, token_mask)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)
    np.testing.assert_allclose(lse, expected_lse, atol=2e-5, rtol=0)


def test_empty_rows_give_zeros_not_nan():
    q, k, v = _qkv(jax.random.key(2), 1, 256, 256, 1, 16)
    mask = np.array([[True, False], [False, False]])
    for impl in ("reference", "dense"):
        out = radial_attention(q, k, v, block_mask=mask, implementation=impl)
        assert not jnp.isnan(out).any()
        assert (out[:, 128:] == 0).all()
    _, lse = attention_reference(q, k, v, mask, block_size=128)
    assert jnp.isneginf(lse[..., 128:]).all()


def test_dense_with_mask_equals_reference():
    q, k, v = _qkv(jax.random.key(3), 1, 640, 640, 2, 64)
    mask = radial_block_mask(5, 128, block_size=64)
    a = radial_attention(q, k, v, block_mask=mask, block_size=64, implementation="dense")
    b = radial_attention(q, k, v, block_mask=mask, block_size=64, implementation="reference")
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_bf16_reference_is_close_to_float64():
    q, k, v = _qkv(jax.random.key(4), 1, 384, 384, 2, 64, jnp.bfloat16)
    mask = radial_block_mask(3, 128, block_size=128)
    out = radial_attention(q, k, v, block_mask=mask, implementation="reference")
    assert out.dtype == jnp.bfloat16
    expected, _ = float64_masked_attention(q, k, v, expand_block_mask(mask, 128, 384, 384))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=0)


def test_gradients_flow_and_match_float64_finite_differences():
    q, k, v = _qkv(jax.random.key(5), 1, 96, 96, 1, 8)
    mask = np.array([[True, False, True], [False, True, False], [True, True, True]])

    def loss(q, k, v):
        out = radial_attention(q, k, v, block_mask=mask, block_size=32, implementation="reference")
        return jnp.sum(out * jnp.cos(out))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(jnp.isfinite(g).all() and jnp.abs(g).max() > 0 for g in grads)
    token_mask = expand_block_mask(mask, 32, 96, 96)
    f64 = lambda q, k, v: np.sum((o := float64_masked_attention(q, k, v, token_mask)[0]) * np.cos(o))
    base = [np.asarray(x, np.float64) for x in (q, k, v)]
    rng = np.random.default_rng(0)
    for arg in range(3):
        direction = rng.standard_normal(base[arg].shape)
        eps = 1e-6
        plus = [x.copy() for x in base]
        minus = [x.copy() for x in base]
        plus[arg] += eps * direction
        minus[arg] -= eps * direction
        numeric = (f64(*plus) - f64(*minus)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grads[arg], np.float64) * direction))
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric)), (arg, numeric, analytic)


def test_custom_scale_is_applied():
    q, k, v = _qkv(jax.random.key(6), 1, 128, 128, 1, 16)
    mask = np.ones((1, 1), bool)
    out = radial_attention(q, k, v, block_mask=mask, scale=0.3, implementation="reference")
    expected, _ = float64_masked_attention(q, k, v, np.ones((128, 128), bool), scale=0.3)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "shapes,mask_shape,message",
    [
        (((1, 128, 2, 16), (1, 128, 2, 16), (1, 128, 2, 16)), (2, 1), "block_mask"),
        (((1, 128, 16), (1, 128, 2, 16), (1, 128, 2, 16)), (1, 1), "q must be"),
        (((1, 128, 2, 16), (1, 128, 2, 16), (1, 64, 2, 16)), (1, 1), "k and v"),
        (((1, 128, 2, 16), (1, 128, 3, 16), (1, 128, 3, 16)), (1, 1), "heads"),
    ],
)
def test_bad_shapes_raise_clear_errors(shapes, mask_shape, message):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=message):
        check_inputs(q, k, v, np.ones(mask_shape, bool), 128)
    # Under the test suite's jaxtyping hook the annotation check may fire first.
    with pytest.raises((ValueError, TypeError)):
        radial_attention(q, k, v, block_mask=np.ones(mask_shape, bool))


def test_unknown_implementation_raises():
    q = jnp.zeros((1, 128, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="implementation"):
        radial_attention(q, q, q, block_mask=np.ones((1, 1), bool), implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU fallback")
def test_auto_falls_back_to_reference_on_cpu_with_a_warning():
    q, k, v = _qkv(jax.random.key(8), 1, 128, 128, 1, 16)
    mask = np.ones((1, 1), bool)
    with pytest.warns(UserWarning, match="reference"):
        out = radial_attention(q, k, v, block_mask=mask)
    np.testing.assert_array_equal(out, radial_attention(q, k, v, block_mask=mask, implementation="reference"))


def test_pallas_implementation_matches_reference():
    q, k, v = _qkv(jax.random.key(9), 1, 300, 300, 2, 32)
    mask = radial_block_mask(3, 100, block_size=64)
    out = radial_attention(q, k, v, block_mask=mask, block_size=64, implementation="pallas")
    ref = radial_attention(q, k, v, block_mask=mask, block_size=64, implementation="reference")
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


def test_dense_attention_chunked_with_a_mask_equals_float64(monkeypatch):
    import radial_jax.attention as attention_lib

    # A budget of 64 query rows: 5 chunks, the last one padded, each with its own token mask rows.
    monkeypatch.setattr(attention_lib, "XLA_LOGITS_BUDGET", 4 * 2 * 520 * 128)
    q, k, v = _qkv(jax.random.key(7), 1, 600, 520, 2, 32)
    mask = np.random.default_rng(7).random((10, 9)) < 0.5
    mask[3] = False  # an empty row: zeros
    out = attention_lib.dense_attention(q, k, v, block_mask=mask, block_size=64)
    expected, _ = float64_masked_attention(q, k, v, expand_block_mask(mask, 64, 600, 520))
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)
    unmasked = attention_lib.dense_attention(q, k, v)
    expected, _ = float64_masked_attention(q, k, v, np.ones((600, 520), bool))
    np.testing.assert_allclose(unmasked, expected, atol=2e-6, rtol=0)


def test_mosaic_off_hopper_falls_through_to_the_next_implementation():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU fallback")
    q, k, v = _qkv(jax.random.key(8), 1, 128, 128, 1, 64)
    mask = np.ones((1, 1), bool)
    out = radial_attention(q, k, v, block_mask=mask, implementation=("mosaic", "reference"))
    np.testing.assert_array_equal(out, radial_attention(q, k, v, block_mask=mask, implementation="reference"))
    with pytest.raises(NotImplementedError, match="mosaic.*Hopper"):
        radial_attention(q, k, v, block_mask=mask, implementation="mosaic")


def test_mosaic_on_a_gpu_that_is_not_hopper_falls_through_to_the_next_implementation(monkeypatch):
    # An Ampere or Blackwell GPU: the chooser refuses mosaic itself (block_sparse_attention does not
    # check, so that the kernel still cross-lowers for CUDA on a CPU), and the next name runs.
    from radial_jax import attention as attention_lib

    q, k, v = _qkv(jax.random.key(9), 1, 128, 128, 1, 64)
    mask = np.ones((1, 1), bool)
    expected = radial_attention(q, k, v, block_mask=mask, implementation="reference")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_lib, "is_hopper", lambda: False)
    out = radial_attention(q, k, v, block_mask=mask, implementation=("mosaic", "reference"))
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(NotImplementedError, match=r"mosaic: the mosaic kernel needs a Hopper GPU \(sm90\)"):
        radial_attention(q, k, v, block_mask=mask, implementation="mosaic")
