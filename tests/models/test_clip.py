"""The CLIP image encoder against transformers' CLIPVisionModel (hidden_states[-2], as diffusers'
Wan I2V pipeline reads it) with the same random weights, and its two converters."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.clip import convert_clip, load_clip
from convert.io import CheckpointError, read_safetensors
from models.clip import CLIP_MEAN, CLIP_STD, encode_image, preprocess
from pipeline_testing import clip_original_state_dict

DIM, HEADS, LAYERS, IMAGE, PATCH = 160, 2, 3, 28, 14  # head_dim 80 as ViT-H/14
TOLERANCE = 1e-4  # of the reference's max |value|; f32 reorderings give ~1e-6


def tiny_transformers_clip(seed: int = 0):
    """Returns a random CLIPVisionModelWithProjection; layer norms perturbed from (1, 0)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=DIM, intermediate_size=2 * DIM, num_attention_heads=HEADS,
                              num_hidden_layers=LAYERS, image_size=IMAGE, patch_size=PATCH, hidden_act="gelu",
                              projection_dim=16)  # fmt: skip
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.add_(torch.randn_like(tensor) * 0.3)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, ours converted from its save_pretrained folder in f32, tmp folder)."""
    root = tmp_path_factory.mktemp("clip")
    reference = tiny_transformers_clip()
    reference.save_pretrained(root / "image_encoder")
    convert_clip(root / "image_encoder", root / "ours", "f32")
    return reference, load_clip(root / "ours"), root


def _images(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)


def test_encoder_matches_transformers_penultimate_hidden_states(models):
    reference, ours, _ = models
    images = _images()
    pixels = np.array(preprocess(jnp.asarray(images), IMAGE))  # writable, for torch
    with torch.no_grad():
        out = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    expected = out.hidden_states[-2].numpy()
    got = np.asarray(encode_image(ours, images))
    assert got.shape == expected.shape == (2, 1 + (IMAGE // PATCH) ** 2, DIM)
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


def test_preprocess_normalises_with_clip_statistics_at_the_native_size():
    images = _images(1)
    expected = ((images.astype(np.float64) * 0.5 + 0.5) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(np.asarray(preprocess(jnp.asarray(images), IMAGE)), expected, atol=1e-6)
    assert preprocess(jnp.zeros((1, 50, 70, 3)), IMAGE).shape == (1, IMAGE, IMAGE, 3)


def test_original_pth_and_transformers_folder_convert_to_identical_trees(models, tmp_path):
    reference, _, root = models
    torch.save(clip_original_state_dict(reference), tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    convert_clip(tmp_path, tmp_path / "ours", "f32")
    from_pth, from_transformers = read_safetensors(tmp_path / "ours" / "model.safetensors"), read_safetensors(
        root / "ours" / "model.safetensors")  # fmt: skip
    assert from_pth.tensors == from_transformers.tensors
    for name in from_transformers.tensors:
        np.testing.assert_array_equal(from_pth.read(name), from_transformers.read(name), err_msg=name)


def test_bf16_encoder_runs_under_strict_promotion_and_tracks_f32(models):
    _, ours, root = models
    bf16 = load_clip(root / "ours", dtype="bf16")
    images = _images(1)
    f32, low = np.asarray(encode_image(ours, images)), np.asarray(encode_image(bf16, images))
    assert low.dtype == np.float32 and np.abs(low - f32).max() <= 0.05 * np.abs(f32).max()


def test_quick_gelu_checkpoint_is_refused_with_the_reason(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=DIM, intermediate_size=8, num_attention_heads=HEADS,
                                     num_hidden_layers=2, image_size=IMAGE, patch_size=PATCH)).save_pretrained(
        tmp_path / "image_encoder")  # fmt: skip
    with pytest.raises(CheckpointError, match="quick_gelu.*exact GELU"):
        convert_clip(tmp_path / "image_encoder", tmp_path / "out")
