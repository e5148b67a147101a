"""Pictures of block masks a person can read: on blocks dark, frame boundaries in red."""

import numpy as np

MAX_PIXELS = 2048  # longest side of the picture


def block_mask_image(
    block_mask: np.ndarray, *, frame_tokens: int | None = None, num_frames: int = 0, block_size: int = 128
) -> np.ndarray:
    """Returns an RGB uint8 image [H, W, 3] of the block mask, one square of pixels per block."""
    rows, cols = block_mask.shape
    scale = max(1, MAX_PIXELS // max(rows, cols))
    image = np.where(block_mask, 30, 245).astype(np.uint8)
    image = np.repeat(np.repeat(image, scale, 0), scale, 1)
    image = np.stack([image] * 3, axis=-1)
    if frame_tokens:
        # A frame boundary at token t falls t / block_size blocks in; draw it where it lands.
        for f in range(1, num_frames):
            pos = int(round(f * frame_tokens / block_size * scale))
            if pos < image.shape[0]:
                image[pos, :, :] = (220, 40, 40)
            if pos < image.shape[1]:
                image[:, pos, :] = (220, 40, 40)
    return image


def save_block_mask_png(block_mask: np.ndarray, path: str, **kwargs) -> None:
    """Writes block_mask_image(block_mask, **kwargs) to a PNG file."""
    from PIL import Image

    Image.fromarray(block_mask_image(block_mask, **kwargs)).save(path)
