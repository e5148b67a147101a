"""The Wan VAE against diffusers' AutoencoderKLWan with the same random weights, and its converters."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.io import read_safetensors
from convert.wan_vae import convert_vae, load_vae
from models.wan.vae import decode, encode, encode_moments

BASE_DIM = 8
NUM_RES_BLOCKS = 2
HEIGHT, WIDTH = 16, 24  # latent 2 x 3: h != w catches swapped axes
TOLERANCE = 1e-4  # of the reference's max |value|; f32 reorderings give ~1e-6


def tiny_diffusers_vae(seed: int = 0):
    """Returns a random f32 AutoencoderKLWan; norm gammas perturbed (diffusers inits them to
    ones, so two exchanged norms would go unnoticed)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=BASE_DIM, z_dim=16, num_res_blocks=NUM_RES_BLOCKS).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("gamma"):
                tensor.uniform_(0.5, 1.5)
    return model


def to_original_name(name: str) -> str:
    """Returns the Wan2.1_VAE.pth name of a diffusers AutoencoderKLWan tensor (written from
    wan/modules/vae.py; checked against diffusers' own convert_wan_vae_to_diffusers below)."""
    per_level = NUM_RES_BLOCKS + 2  # a decoder level: NUM_RES_BLOCKS + 1 resnets, 1 upsampler
    for pattern, replacement in (
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"\.mid_block\.resnets\.0\.", ".middle.0."),
        (r"\.mid_block\.attentions\.0\.", ".middle.1."),
        (r"\.mid_block\.resnets\.1\.", ".middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ):
        name = re.sub(pattern, replacement, name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                  lambda m: f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.", name)  # fmt: skip
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.upsamples.{int(m[1]) * per_level + per_level - 1}.", name)  # fmt: skip
    for theirs, original in (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                             ("conv2", "residual.6"), ("conv_shortcut", "shortcut")):  # fmt: skip
        name = re.sub(rf"\.(downsamples|middle|upsamples)\.(\d+)\.{theirs}\.", rf".\1.\2.{original}.", name)
    return name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers model, our WanVAE converted from its save_pretrained folder, tmp folder)."""
    root = tmp_path_factory.mktemp("vae")
    reference = tiny_diffusers_vae()
    reference.save_pretrained(root / "diffusers")
    convert_vae(root / "diffusers", root / "ours")
    return reference, load_vae(root / "ours"), root


def _channels_last(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 4, 1).numpy()


def _relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers_across_chunk_boundaries(models, frames):
    reference, vae, _ = models
    video = np.random.default_rng(frames).uniform(-1, 1, (2, frames, HEIGHT, WIDTH, 3)).astype(np.float32)
    mu, logvar = encode_moments(vae, jnp.asarray(video))
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist
    assert mu.shape == (2, 1 + (frames - 1) // 4, HEIGHT // 8, WIDTH // 8, 16)
    assert _relative_error(mu, _channels_last(posterior.mean)) <= TOLERANCE
    assert _relative_error(logvar, _channels_last(posterior.logvar)) <= TOLERANCE
    mean, std = (np.asarray(reference.config[k], np.float32) for k in ("latents_mean", "latents_std"))
    np.testing.assert_allclose(encode(vae, jnp.asarray(video)), (np.asarray(mu) - mean) / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_diffusers_across_chunk_boundaries(models, latent_frames):
    reference, vae, _ = models
    latents = np.random.default_rng(latent_frames).normal(size=(1, latent_frames, 2, 3, 16)).astype(np.float32)
    video = decode(vae, jnp.asarray(latents))
    mean, std = (np.asarray(reference.config[k], np.float32) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():  # diffusers decodes un-normalised latents; Wan's pipeline normalises
        raw = torch.from_numpy(latents * std + mean).permute(0, 4, 1, 2, 3)
        expected = _channels_last(reference.decode(raw).sample)
    assert video.shape == (1, 1 + 4 * (latent_frames - 1), HEIGHT, WIDTH, 3) == expected.shape
    assert np.mean(np.abs(expected) >= 1.0) < 0.01  # the comparison is not hidden by clipping
    assert _relative_error(video, expected) <= TOLERANCE


def test_bf16_decode_adds_about_one_uint8_level_of_error_to_the_f32_decode(models):
    """The error a bf16 VAE (`--vae-dtype bf16`) adds, against diffusers' f32 decode: measured
    0.007-0.008 mean and <= 0.08 max |error| on [-1, 1] here (~1 and <= 10 levels of the uint8
    video). The bound is twice that; our f32 decode stays within TOLERANCE of the oracle."""
    reference, vae, root = models
    vae_bf16 = load_vae(root / "ours", dtype="bf16")
    assert vae_bf16.decoder.conv1.kernel.get_value().dtype == jnp.bfloat16
    latents = np.random.default_rng(0).normal(size=(1, 3, 2, 3, 16)).astype(np.float32)
    mean, std = (np.asarray(reference.config[k], np.float32) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        raw = torch.from_numpy(latents * std + mean).permute(0, 4, 1, 2, 3)
        expected = np.clip(_channels_last(reference.decode(raw).sample), -1, 1)
    video_bf16 = decode(vae_bf16, jnp.asarray(latents))
    assert video_bf16.dtype == jnp.float32
    error = np.abs(np.asarray(video_bf16) - expected)
    assert 1e-3 < error.mean() <= 0.016 and error.max() <= 0.16, (error.mean(), error.max())
    assert _relative_error(decode(vae, jnp.asarray(latents)), expected) <= TOLERANCE


def test_original_pth_and_diffusers_folder_convert_to_identical_trees(models, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    reference, _, root = models
    state = reference.state_dict()
    original = {to_original_name(name): tensor for name, tensor in state.items()}
    assert set(convert_wan_vae_to_diffusers(dict(original))) == set(state)  # our renaming is the real layout
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    convert_vae(tmp_path / "Wan2.1_VAE.pth", tmp_path / "from_pth")
    from_pth = read_safetensors(tmp_path / "from_pth" / "model.safetensors")
    from_diffusers = read_safetensors(root / "ours" / "model.safetensors")
    assert from_pth.tensors == from_diffusers.tensors
    for name in from_diffusers.tensors:
        np.testing.assert_array_equal(from_pth.read(name), from_diffusers.read(name), err_msg=name)


@pytest.mark.parametrize("frames,height,error", [(4, 16, "4k\\+1"), (5, 12, "multiples of 8")])
def test_encode_rejects_bad_video_shapes(models, frames, height, error):
    _, vae, _ = models
    with pytest.raises(ValueError, match=error):
        encode(vae, jnp.zeros((1, frames, height, 16, 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_conv_as_one_frame_stacked_2d_conv_equals_the_3d_conv(dtype, monkeypatch):
    # conv_with_cache computes the 3x3x3 convs as a 2D conv over stacked frame windows; it must be
    # the 3D conv the original runs (the same products; float32 sums may differ in order only).
    import jax
    from flax import nnx

    from models.wan import vae_blocks
    from models.wan.vae_blocks import conv3d, conv_with_cache

    calls = []  # the 2D form must be the one taken, or this compares the 3D conv with itself
    stacked = vae_blocks._frame_stacked_conv
    monkeypatch.setattr(vae_blocks, "_frame_stacked_conv", lambda *a: calls.append(1) or stacked(*a))
    conv = conv3d(8, 12, dtype=dtype, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(1), (12,)).astype(dtype)
    x = jax.random.normal(jax.random.key(2), (2, 4, 10, 14, 8)).astype(dtype)
    cache = jax.random.normal(jax.random.key(3), (2, 2, 10, 14, 8)).astype(dtype)
    out, new_cache = conv_with_cache(conv, x, cache)
    expected = conv(jnp.concatenate([cache, x], axis=1))
    assert out.shape == expected.shape == (2, 4, 10, 14, 12) and out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(new_cache, x[:, -2:])
    assert len(calls) == 1
