"""train/lora.py: LoRA leaves on the Wan DiT's Linear layers, checked against float64 numpy,
against convert/lora.py's merge of the same factors written under diffusers names, and for
which leaves get gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from convert.lora import merge_loras
from models.wan import WAN_TINY, WanModel
from train.lora import (
    CROSS_ATTENTION, FFN, SELF_ATTENTION, LoraConfig, LoRALinear, apply_lora, lora_factors, lora_modules, merge_lora,
    module_name,
)

CONFIG = dataclasses.replace(WAN_TINY, num_layers=2)
LORA = LoraConfig(rank=3, alpha=7.0)  # alpha != rank: a missing or doubled scale shows


def _inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 2)
    latents = jax.random.normal(keys[0], (1, 2, 4, 6, CONFIG.in_dim), jnp.float32)
    context = jax.random.normal(keys[1], (1, 5, CONFIG.text_dim), jnp.float32)
    return latents, jnp.array([700.0], jnp.float32), context


def _perturb_b(model, seed: int = 1, std: float = 0.2):
    """Gives every lora_b random values (B is zero at init, which would hide most bugs)."""
    for i, module in enumerate(lora_modules(model).values()):
        shape = module.lora_b[...].shape
        module.lora_b.set_value(std * jax.random.normal(jax.random.key(seed + i), shape, jnp.float32))


def _model(lora: LoraConfig | None = LORA, seed: int = 0):
    model = WanModel(CONFIG, rngs=nnx.Rngs(seed))
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(seed + 100))
    return model


def test_lora_at_init_leaves_output_bit_identical():
    base = _model(None)
    want = base(*_inputs())
    apply_lora(base, LoraConfig(rank=4, alpha=4.0, targets=SELF_ATTENTION + CROSS_ATTENTION + FFN),
               rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(np.asarray(base(*_inputs())), np.asarray(want))


def test_lora_keeps_base_paths_and_adds_lora_leaves():
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(_model(None), nnx.Param))}
    model = _model()
    lora_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    other_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))}
    assert other_paths == base_paths
    want = {("blocks", n, "self_attn", m, leaf) for n in range(2) for m in "qkvo" for leaf in ("lora_a", "lora_b")}
    assert lora_paths == want
    layer = model.blocks[1].self_attn.o
    assert layer.lora_a[...].shape == (CONFIG.dim, 3) and layer.lora_b[...].shape == (3, CONFIG.dim)
    assert layer.lora_a[...].dtype == jnp.float32 and float(jnp.abs(layer.lora_b[...]).max()) == 0.0


def test_lora_linear_matches_float64_numpy():
    linear = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    layer = LoRALinear(linear, rank=2, scale=7.0 / 2, rngs=nnx.Rngs(1))
    layer.lora_b.set_value(jax.random.normal(jax.random.key(2), (2, 5), jnp.float32))
    x = np.random.default_rng(0).normal(size=(3, 6))
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    want = x @ f64(layer.kernel) + f64(layer.bias) + 3.5 * (x @ f64(layer.lora_a)) @ f64(layer.lora_b)
    got = np.asarray(layer(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_after_perturbing_b():
    model = _model()
    _perturb_b(model)
    unmerged = model(*_inputs())
    base = model(*_inputs())  # same model, checked to differ from the base below
    merged_model = merge_lora(model)
    assert not lora_modules(merged_model)
    assert not nnx.state(merged_model, nnx.LoRAParam)
    merged = merged_model(*_inputs())
    reference = _model(None)(*_inputs())
    scale = float(jnp.abs(unmerged).max())
    assert float(jnp.abs(unmerged - reference).max()) > 1e-2 * scale  # the LoRA does change the output
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5 * scale, rtol=0)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(unmerged))


def test_merged_state_loads_into_a_plain_model():
    model = _model()
    _perturb_b(model)
    want = model(*_inputs())
    plain = _model(None, seed=3)
    nnx.update(plain, nnx.state(merge_lora(model)))
    np.testing.assert_allclose(np.asarray(plain(*_inputs())), np.asarray(want), atol=2e-5 * float(jnp.abs(want).max()))


def test_factors_written_under_diffusers_names_merge_like_our_forward(tmp_path):
    """The naming contract for export: lora_factors + module_name give a PEFT file that
    convert/lora.py (an independent reader) merges into the same model as our forward."""
    lora = LoraConfig(rank=3, alpha=7.0, targets=SELF_ATTENTION + ("blocks.1.ffn.0", "blocks.0.cross_attn.v"))
    model = _model(lora)
    _perturb_b(model)
    want = model(*_inputs())
    tensors = {}
    for path, (down, up, alpha) in lora_factors(model).items():
        name = "transformer." + module_name(path, "diffusers")
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, tmp_path / "lora.safetensors")
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "transformer.blocks.1.ffn.net.0.proj.lora_B.weight" in tensors
    got = merge_loras(_model(None), [(tmp_path / "lora.safetensors", 1.0)])(*_inputs())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * float(jnp.abs(want).max()))


def test_only_lora_leaves_get_gradients_and_updates():
    model = _model()
    _perturb_b(model)
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))

    def loss(m):
        return jnp.mean(jnp.square(m(*_inputs())))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    grad_paths = {p for p, _ in nnx.to_flat_state(grads)}
    assert grad_paths == {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert all(float(jnp.abs(g[...]).max()) > 0 for _, g in nnx.to_flat_state(grads))

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    optimizer.update(model, grads)
    base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    lora_after = nnx.state(model, nnx.LoRAParam)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), lora_after, lora_before))
    assert min(moved) > 0


def test_gradient_of_b_matches_finite_difference():
    model = _model()
    layer = model.blocks[0].self_attn.v

    def loss(m):
        return jnp.sum(m(*_inputs()) * jnp.linspace(-1.0, 1.0, CONFIG.out_dim, dtype=jnp.float32))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    analytic = float(grads["blocks"][0]["self_attn"]["v"]["lora_b"][...][1, 2])
    eps = 1e-2
    values = []
    for sign in (1.0, -1.0):
        layer.lora_b.set_value(layer.lora_b[...].at[1, 2].set(sign * eps))
        values.append(float(loss(model)))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 1e-4 and abs(numeric) > 1e-3


def test_unknown_target_names_the_valid_layers():
    with pytest.raises(ValueError, match=r"match no Linear layer; valid layers: .*blocks\.\*\.self_attn\.q"):
        apply_lora(_model(None), LoraConfig(targets=("blocks.*.attn1.to_q",)), rngs=nnx.Rngs(0))


def test_applying_twice_is_refused():
    with pytest.raises(ValueError, match="already has a LoRA"):
        apply_lora(_model(), LORA, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("path, layout, name", [
    ("blocks.3.self_attn.q", "diffusers", "blocks.3.attn1.to_q"),
    ("blocks.0.self_attn.o", "diffusers", "blocks.0.attn1.to_out.0"),
    ("blocks.12.cross_attn.k", "diffusers", "blocks.12.attn2.to_k"),
    ("blocks.2.ffn.2", "diffusers", "blocks.2.ffn.net.2"),
    ("blocks.2.ffn.0", "original", "blocks.2.ffn.0"),
])
def test_module_name_reads_the_converter_tables(path, layout, name):
    assert module_name(path, layout) == name
