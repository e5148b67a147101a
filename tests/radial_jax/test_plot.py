"""The block mask picture: every block drawn as the mask says, frame lines where frames start,
room for the title and legend whatever the mask's size."""

import numpy as np
import pytest

from radial_jax import mask as mask_lib
from radial_jax import plot


def _plot_area(image, block_mask, title_lines):
    rows, cols = block_mask.shape
    scale = plot.block_pixels(rows, cols)
    top = plot.plot_top(title_lines)
    return image[top : top + rows * scale, plot.MARGIN_LEFT : plot.MARGIN_LEFT + cols * scale], scale


@pytest.mark.parametrize("frames, tokens", [(21, 1560), (5, 60), (7, 300)])  # 1.3B 480p-81f: 256 blocks
def test_each_block_is_drawn_dark_when_on_and_light_when_off(frames, tokens):
    block_mask = mask_lib.radial_block_mask(frames, tokens)
    image = plot.block_mask_image(block_mask, title=["a title"])  # no frame lines: every pixel is a cell
    area, scale = _plot_area(image, block_mask, 1)
    centres = area[scale // 2 :: scale, scale // 2 :: scale]
    assert centres.shape[:2] == block_mask.shape
    np.testing.assert_array_equal(np.all(centres == plot.ON, axis=-1), block_mask)
    np.testing.assert_array_equal(np.all(centres == plot.OFF, axis=-1), ~block_mask)


def test_frame_boundaries_are_red_lines_where_each_latent_frame_starts():
    frames, tokens = 21, 3600  # 14B 720p-81f: 591 blocks, 2 pixels each
    block_mask = mask_lib.radial_block_mask(frames, tokens)
    image = plot.block_mask_image(block_mask, frame_tokens=tokens, num_frames=frames)
    area, scale = _plot_area(image, block_mask, 0)
    assert scale == 2 and area.shape[:2] == (591 * 2, 591 * 2)
    red_rows = np.flatnonzero(np.all(area[:, 0] == plot.FRAME_LINE, axis=-1))
    red_cols = np.flatnonzero(np.all(area[0, :] == plot.FRAME_LINE, axis=-1))
    expected = [round(f * tokens / 128 * scale) for f in range(1, frames)]
    assert list(red_rows) == expected and list(red_cols) == expected


def test_long_title_and_legend_widen_a_small_mask_picture():
    block_mask = np.eye(3, dtype=bool)
    title = ["a fairly long title line that is wider than the plot of three blocks " * 2]
    image = plot.block_mask_image(block_mask, frame_tokens=60, num_frames=5, title=title)
    from PIL import Image, ImageDraw

    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title[0], font=plot._font(plot.FONT_SIZE))
    assert image.shape[1] >= plot.MARGIN_LEFT + width
    assert image.shape[0] >= plot.MIN_PLOT_PIXELS  # a 3-block mask is drawn large enough to read


def test_save_writes_a_png_whatever_the_file_name(tmp_path):
    from PIL import Image

    plot.save_block_mask_png(np.eye(4, dtype=bool), tmp_path / "mask.partial")
    with Image.open(tmp_path / "mask.partial") as img:
        assert img.format == "PNG" and img.mode == "RGB"
