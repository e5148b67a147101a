"""A latent cache of random latents and contexts, written in the cache format of train/cache.py
without the VAE and text encoder (loop tests need the format, not the encoders)."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from train.cache import FORMAT, FORMAT_VERSION, MANIFEST, SAMPLES_DIR


def random_cache(root: str | Path, num_samples: int, latent_shape: tuple[int, int, int, int], *, context_dim: int,
                 text_len: int, frames: int, height: int, width: int, seed: int = 0) -> Path:
    """Writes `num_samples` samples of N(0, 1) latents [F, H, W, C] and contexts of 1..text_len
    tokens; returns root. frames/height/width: the video size the manifest claims."""
    root = Path(root)
    (root / SAMPLES_DIR).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        tokens = int(rng.integers(1, text_len + 1))
        file = f"{SAMPLES_DIR}/s{i}.safetensors"
        save_file({"latents": rng.standard_normal(latent_shape).astype(np.float32),
                   "context": rng.standard_normal((tokens, context_dim)).astype(np.float32)}, str(root / file))
        samples.append({"id": f"s{i}", "file": file, "text_tokens": tokens})
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": True, "latent_shape": list(latent_shape),
                "context_dim": context_dim, "text_len": text_len, "samples": samples, "skipped": [],
                "config": {"width": width, "height": height, "frames": frames}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root
