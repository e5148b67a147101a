"""LoRA merging (convert/lora.py) vs the same LoRA merged into the PyTorch weights of a diffusers
model (W += alpha / rank * B @ A, the definition), through our converter; the naming variants
Wan LoRAs ship in; one error listing every key that does not fit."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert import CheckpointError, wan_diffusers
from convert.lora import lora_updates, merge_loras, parse_lora_arg
from convert.transforms import expand_rows
from convert.wan import abstract_wan
from tests.wan_testing import inputs, ours_kwargs, relative_error, save_and_convert, tiny_diffusers, torch_forward

RANK, ALPHA = 3, 6.0
# diffusers module -> original module, of the tiny model's Linear layers a LoRA usually targets
MODULES = {
    "blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "blocks.1.attn1.to_out.0": "blocks.1.self_attn.o",
    "blocks.0.attn2.to_k": "blocks.0.cross_attn.k",
    "blocks.1.ffn.net.0.proj": "blocks.1.ffn.0",
}


def _lora_factors(torch_model, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{diffusers module: (A [rank, in], B [out, rank])}, random, sized from the model."""
    rng = np.random.default_rng(seed)
    factors = {}
    for module in MODULES:
        out_dim, in_dim = torch_model.get_submodule(module).weight.shape
        factors[module] = (rng.normal(size=(RANK, in_dim)).astype(np.float32) * 0.3,
                           rng.normal(size=(out_dim, RANK)).astype(np.float32) * 0.3)
    return factors


def _write(path, factors, style: str):
    """Writes the LoRA in one of the spellings Wan LoRAs ship in."""
    tensors, metadata = {}, None
    for module, (a, b) in factors.items():
        if style == "peft_diffusers":  # diffusers' save_lora_weights: the PEFT config, prefixed, in the metadata
            tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = a, b
            metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
        elif style == "original_alpha":  # original names, per-module alpha
            name = f"diffusion_model.{MODULES[module]}"
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.array(ALPHA, np.float32)
        elif style == "kohya":
            name = "lora_unet_" + MODULES[module].replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.array([ALPHA], np.float32)
        elif style == "peft_adapter_named":  # PEFT with an adapter name, scale folded into B
            name = f"base_model.model.{MODULES[module]}"
            tensors[f"{name}.lora_A.default.weight"] = a
            tensors[f"{name}.lora_B.default.weight"] = b * (ALPHA / RANK)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_model = tiny_diffusers("t2v", seed=3)
    return torch_model, tmp_path_factory.mktemp("lora")


@nnx.jit
def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


def test_merged_lora_matches_the_lora_merged_into_diffusers_weights(base):
    torch_model, root = base
    factors = _lora_factors(torch_model)
    _, ours = save_and_convert(torch_model, root / "base")
    lora_model = tiny_diffusers("t2v", seed=3)
    with torch.no_grad():
        for module, (a, b) in factors.items():
            lora_model.get_submodule(module).weight += torch.from_numpy(ALPHA / RANK * b @ a)
    x, t, context, _, _ = inputs("t2v")
    expected, _ = torch_forward(lora_model, x, t, context)
    before, _ = torch_forward(torch_model, x, t, context)
    assert relative_error(before, expected) > 1e-2  # the LoRA changes the output

    merge_loras(ours, [(_write(root / "lora.safetensors", factors, "peft_diffusers"), 1.0)])
    args, kwargs = ours_kwargs(x, t, context)
    out = np.moveaxis(np.asarray(_call(ours, *args, **kwargs)), -1, 1)
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.parametrize("style", ["original_alpha", "kohya", "peft_adapter_named"])
def test_every_spelling_gives_the_same_updates(base, tmp_path, style):
    torch_model, _ = base
    factors = _lora_factors(torch_model)
    config = _config(torch_model, tmp_path)
    want = {u.target: np.asarray(u.delta())
            for u in lora_updates(_write(tmp_path / "a.safetensors", factors, "peft_diffusers"), config)}
    got = {u.target: np.asarray(u.delta()) for u in lora_updates(_write(tmp_path / "b.safetensors", factors, style),
                                                                 config)}  # fmt: skip
    assert sorted(got) == sorted(want) == sorted(f"{m}.kernel" for m in MODULES.values())
    for target, delta in want.items():
        np.testing.assert_allclose(got[target], delta, rtol=1e-6, atol=1e-7)


def test_strength_scales_and_two_loras_add(base, tmp_path):
    torch_model, root = base
    factors = _lora_factors(torch_model)
    path = _write(tmp_path / "a.safetensors", factors, "kohya")
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    kernel = lambda m: np.asarray(m.blocks[0].self_attn.q.kernel.get_value())  # noqa: E731
    start = kernel(ours)
    (update,) = [u for u in lora_updates(path, ours.config) if u.target == "blocks.0.self_attn.q.kernel"]
    merge_loras(ours, [(path, 0.5), (path, 0.25)])
    np.testing.assert_allclose(kernel(ours), start + 0.75 * np.asarray(update.delta()), rtol=1e-5, atol=1e-6)


def test_weight_and_bias_diffs_are_added(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    q = ours.blocks[0].self_attn
    scale, bias = np.asarray(q.norm_q.scale.get_value()), np.asarray(q.q.bias.get_value())
    diff, diff_b = np.full(scale.shape, 0.5, np.float32), np.arange(bias.size, dtype=np.float32)
    path = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.norm_q.diff": diff,
               "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b}, str(path))  # fmt: skip
    merge_loras(ours, [(path, 2.0)])
    np.testing.assert_allclose(np.asarray(q.norm_q.scale.get_value()), scale + 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.q.bias.get_value()), bias + 2 * diff_b, rtol=1e-6)


def test_every_key_that_does_not_fit_is_listed_and_nothing_changes(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m")
    a, b = np.ones((RANK, 40), np.float32), np.ones((40, RANK), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file({
        "transformer.blocks.0.attn1.to_q.lora_A.weight": a,  # fine
        "transformer.blocks.0.attn1.to_q.lora_B.weight": b,
        "transformer.blocks.0.attn1.to_k.lora_A.weight": a,  # no B
        "transformer.blocks.7.attn1.to_v.lora_A.weight": a,  # no block 7
        "transformer.blocks.1.ffn.net.2.lora_A.weight": a,  # ffn.net.2 takes 48 inputs, not 40
        "transformer.blocks.1.ffn.net.2.lora_B.weight": b,
        "transformer.patch_embedding.lora_A.weight": a,  # a Conv3d
        "transformer.patch_embedding.lora_B.weight": b,
        "diffusion_model.vace_blocks.0.self_attn.q.lora_down.weight": a,  # VACE: same shapes, other module
        "transformer.blocks.0.attn1.to_v.lora_magnitude_vector": b[:, 0],  # DoRA
        "transformer.blocks.0.attn1.norm_q.diff_b": b[:, 0],  # an RMSNorm has no bias
        "transformer.blocks.0.attn1.to_q.lora_A.default.weight": a,  # the same A twice
    }, str(path))  # fmt: skip
    before = np.asarray(ours.blocks[0].self_attn.q.kernel.get_value())
    with pytest.raises(CheckpointError) as err:
        merge_loras(ours, [(path, 1.0)])
    message = str(err.value)
    for fragment in ("8 problems", "transformer.blocks.0.attn1.to_k: a LoRA down (A) matrix without its partner",
                     "blocks.7.attn1.to_v.lora_A.weight: not a module of this DiT",
                     "transformer.blocks.1.ffn.net.2: B @ A of shape (40, 40) for blocks.1.ffn.2.kernel, which "
                     "needs (40, 48)", "transformer.patch_embedding: LoRA of shapes",
                     "vace_blocks.0.self_attn.q.lora_down.weight: not a module of this DiT",
                     "lora_magnitude_vector: DoRA, LoKr and LoHa", "norm_q: diff_b: the model has no bias there",
                     "a second down tensor for transformer.blocks.0.attn1.to_q"):  # fmt: skip
        assert fragment in message, message
    np.testing.assert_array_equal(np.asarray(ours.blocks[0].self_attn.q.kernel.get_value()), before)
    for name, content in (("missing", None), ("empty", {}), ("alpha_only", {"blocks.0.self_attn.q.alpha": a[0, :1]})):
        if content is not None:
            save_file(content, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match="no such .safetensors file|no LoRA weights"):
            lora_updates(tmp_path / f"{name}.safetensors", ours.config)


def test_peft_metadata_alpha_pattern_and_rslora_scale_like_peft(base, tmp_path):
    torch_model, _ = base
    config = _config(torch_model, tmp_path)
    factors = _lora_factors(torch_model)
    path = _write(tmp_path / "plain.safetensors", factors, "peft_adapter_named")  # scale 1
    plain = {u.target: u.factor for u in lora_updates(path, config)}
    for meta, want in (({"r": RANK, "lora_alpha": 12, "alpha_pattern": {"blocks.0.attn1.to_q": 3}},
                        {"blocks.0.self_attn.q.kernel": 3 / RANK, "blocks.1.self_attn.o.kernel": 12 / RANK}),
                       ({"r": RANK, "lora_alpha": 12, "use_rslora": True},
                        {"blocks.0.self_attn.q.kernel": 12 / RANK**0.5})):  # fmt: skip
        tensors = {f"transformer.{m}.lora_{ab}.weight": f[i] for m, f in factors.items() for i, ab in enumerate("AB")}
        save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
        got = {u.target: u.factor for u in lora_updates(tmp_path / "meta.safetensors", config)}
        for target, factor in want.items():
            assert got[target] == pytest.approx(factor), (meta, target)
    assert set(plain.values()) == {1.0}


# Overlapping patterns listed in sorted order, as diffusers writes the metadata: PEFT takes the
# first entry that matches, so blocks.0.attn1.to_q gets "0.attn1.to_q" (alpha 6), not "to_q" (8),
# and blocks.1.attn1.to_q rank 2 from "1.attn1.to_q", not 3 from "to_q".
OVERLAPPING = dict(r=5, lora_alpha=4, target_modules=["to_q", "to_k"],
                   alpha_pattern={"0.attn1.to_q": 6, "blocks.1.attn1.to_q": 1, "to_q": 8},
                   rank_pattern={"1.attn1.to_q": 2, "attn2.to_q": 4, "to_q": 3})  # fmt: skip


@pytest.mark.parametrize("layout", ["bare", "transformer_prefixed"])
def test_overlapping_peft_patterns_take_the_first_match_like_peft(base, tmp_path, layout):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict

    torch_model, _ = base
    trained = tiny_diffusers("t2v", seed=3)
    torch.manual_seed(7)
    trained.add_adapter(LoraConfig(init_lora_weights=False, **OVERLAPPING))
    if layout == "bare":  # the model's save_lora_adapter: bare keys and metadata
        trained.save_lora_adapter(tmp_path, safe_serialization=True)
    else:  # the pipeline's save_lora_weights: "transformer." on every key and metadata field
        WanLoraLoaderMixin.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained),
                                             transformer_lora_adapter_metadata=trained.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    # The oracle: the file loaded back by diffusers into PEFT layers.
    loaded = tiny_diffusers("t2v", seed=3)
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    loaded.load_lora_adapter(state, metadata=metadata, prefix=None if layout == "bare" else "transformer",
                             adapter_name="a")  # fmt: skip
    peft_scales = {f"{name}.weight": m.scaling["a"] for name, m in loaded.named_modules() if hasattr(m, "scaling")}
    assert len(peft_scales) == 8

    _, ours = save_and_convert(torch_model, tmp_path / "m")
    ours_scales = {u.target: u.factor for u in lora_updates(path, ours.config)}
    target = _diffusers_targets(ours.config)
    assert {target[name]: scale for name, scale in peft_scales.items()} == pytest.approx(ours_scales, rel=1e-12)
    assert ours_scales["blocks.0.self_attn.q.kernel"] == pytest.approx(6 / 3)  # overlapping entries disagree
    assert ours_scales["blocks.1.self_attn.q.kernel"] == pytest.approx(1 / 2)

    x, t, context, _, _ = inputs("t2v")
    expected, _ = torch_forward(loaded, x, t, context)
    assert relative_error(torch_forward(torch_model, x, t, context)[0], expected) > 1e-2
    merge_loras(ours, [(path, 1.0)])
    args, kwargs = ours_kwargs(x, t, context)
    out = np.moveaxis(np.asarray(_call(ours, *args, **kwargs)), -1, 1)
    assert relative_error(out, expected) <= 1e-4


def test_a_rank_that_contradicts_the_peft_metadata_is_refused(base, tmp_path):
    torch_model, _ = base
    config = _config(torch_model, tmp_path)
    a, b = np.ones((3, 40), np.float32), np.ones((40, 3), np.float32)
    tensors = {f"blocks.{i}.attn1.to_q.lora_{ab}.weight": m for i in (0, 1) for ab, m in (("A", a), ("B", b))}
    # PEFT would build blocks.1.attn1.to_q with rank 2 (the first match) and fail to load rank 3.
    meta = {"r": 3, "lora_alpha": 3, "rank_pattern": {"1.attn1.to_q": 2, "to_q": 3}}
    save_file(tensors, str(tmp_path / "r.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"(?s)1 problems.*blocks.1.attn1.to_q: tensors of rank 3, but the PEFT "
                                              r"metadata says 2 \(rank_pattern '1.attn1.to_q'\)"):  # fmt: skip
        lora_updates(tmp_path / "r.safetensors", config)


def test_alpha_handling_matches_diffusers_conversion_of_original_loras(base, tmp_path):
    # diffusers folds alpha / rank into A and B when it converts an original-layout LoRA (no peft needed).
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    torch_model, _ = base
    config = _config(torch_model, tmp_path)
    rng = np.random.default_rng(5)
    original = {}
    for i in range(2):
        for layer, (out_dim, in_dim) in (("self_attn.q", (40, 40)), ("cross_attn.v", (40, 40)), ("ffn.2", (40, 48))):
            name = f"diffusion_model.blocks.{i}.{layer}"
            original[f"{name}.lora_down.weight"] = rng.normal(size=(RANK, in_dim)).astype(np.float32)
            original[f"{name}.lora_up.weight"] = rng.normal(size=(out_dim, RANK)).astype(np.float32)
            original[f"{name}.alpha"] = np.array(ALPHA + i, np.float32)
            original[f"{name}.diff_b"] = rng.normal(size=out_dim).astype(np.float32)
    save_file(original, str(tmp_path / "original.safetensors"))
    # Copies: diffusers scales some A/B in place, which would reach `original` through from_numpy.
    converted = _convert_non_diffusers_wan_lora_to_diffusers({k: torch.tensor(v) for k, v in original.items()})
    save_file({k: v.numpy() for k, v in converted.items()}, str(tmp_path / "converted.safetensors"))

    def deltas(name):
        out = {}
        for u in lora_updates(tmp_path / name, config):
            out[u.target] = out.get(u.target, 0) + np.asarray(u.delta())
        return out

    ours, theirs = deltas("original.safetensors"), deltas("converted.safetensors")
    assert len(ours) == 12 and sorted(ours) == sorted(theirs)
    for target in ours:
        np.testing.assert_allclose(ours[target], theirs[target], rtol=1e-5, atol=1e-6)


def test_linear_weight_diff_and_bf16_lora_into_a_bf16_model(base, tmp_path):
    torch_model, _ = base
    _, ours = save_and_convert(torch_model, tmp_path / "m", dtype="bf16")
    head = ours.blocks[0].self_attn.o.kernel
    start = np.asarray(head.get_value(), np.float32)
    assert head.get_value().dtype == jnp.bfloat16
    diff = np.random.default_rng(2).normal(size=start.shape[::-1]).astype(ml_dtypes.bfloat16)  # [out, in]
    save_file({"diffusion_model.blocks.0.self_attn.o.diff": diff}, str(tmp_path / "d.safetensors"))
    merge_loras(ours, [(tmp_path / "d.safetensors", 0.5)])
    assert head.get_value().dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(head.get_value(), np.float32), start + 0.5 * diff.astype(np.float32).T,
                               rtol=1e-2, atol=1e-2)  # fmt: skip


@pytest.mark.parametrize("arg, want", [("a.safetensors", ("a.safetensors", 1.0)),
                                       ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5)),
                                       ("a.safetensors:-1e-1", ("a.safetensors", -0.1)),
                                       ("C:/loras/a.safetensors", ("C:/loras/a.safetensors", 1.0))])
def test_lora_argument_parsing(arg, want):
    path, strength = parse_lora_arg(arg)
    assert (str(path), strength) == want


def _diffusers_targets(config) -> dict[str, str]:
    """{diffusers parameter name: our parameter path}, from the converter's table."""
    _, flat = abstract_wan(config)
    return {row.source: row.target for row in expand_rows(wan_diffusers.TABLE, config.num_layers, targets=flat)}


def _config(torch_model, tmp_path):
    return save_and_convert(torch_model, tmp_path / "cfg")[1].config
