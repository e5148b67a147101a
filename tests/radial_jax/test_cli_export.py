"""`radial-jax export`: a trained LoRA rewritten in ComfyUI names merges exactly like the file the
training wrote, and back again."""

import numpy as np
from flax import nnx

from convert.lora import merge_loras
from models.wan import WAN_TINY, WanModel
from models.wan.pipeline import random_weights
from radial_jax.cli import main
from train.export import export_lora, lora_tensors, read_exported
from train.lora import LoraConfig, apply_lora, lora_modules

CONFIG = WAN_TINY


def _base():
    return random_weights(lambda rngs: WanModel(CONFIG, rngs=rngs), 0)


def _kernels(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if p[-1] == "kernel"}  # fmt: skip


def test_export_to_comfy_and_back_merges_the_same(tmp_path, capsys):
    trained = apply_lora(_base(), LoraConfig(rank=2, alpha=5.0), rngs=nnx.Rngs(1))
    for i, module in enumerate(lora_modules(trained).values()):
        module.lora_b.set_value(np.random.default_rng(i).normal(size=module.lora_b[...].shape).astype(np.float32))
    run = tmp_path / "run"
    export_lora(trained, run / "lora.safetensors")  # what a training run leaves
    assert main(["export", str(run), "--out", str(tmp_path / "comfy.safetensors")]) == 0
    assert "8 LoRA modules, rank 2, alpha 5, comfy names" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "comfy.safetensors"), "--format", "diffusers",
                 "--out", str(tmp_path / "back.safetensors")]) == 0  # fmt: skip

    merged = {name: _kernels(merge_loras(_base(), [(tmp_path / name, 1.0)]))
              for name in ("comfy.safetensors", "back.safetensors")}  # fmt: skip
    want = _kernels(merge_loras(_base(), [(run / "lora.safetensors", 1.0)]))
    assert any(not np.array_equal(want[k], v) for k, v in _kernels(_base()).items())  # the LoRA changes kernels
    for got in merged.values():
        for name, kernel in want.items():
            np.testing.assert_allclose(got[name], kernel, rtol=1e-6, atol=1e-6)
    comfy = lora_tensors(read_exported(tmp_path / "comfy.safetensors"), "comfy")
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"] == 5.0


def test_export_of_a_foreign_file_is_one_line_on_stderr(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.safetensors: no such file" in err
