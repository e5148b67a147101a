"""Pictures of block masks a person can read without the README: computed blocks dark, skipped
blocks light, latent frame boundaries in red, axes in blocks (query rows, key columns), a title
and a legend. Drawn with PIL (a dependency already), so no plotting library is needed."""

from collections.abc import Sequence

import numpy as np

PLOT_PIXELS = 1200  # the mask's longest side at most; 591 blocks (14B 720p) get 2 px each
MIN_PLOT_PIXELS = 480  # a mask of a few blocks is drawn at least this large, so its labels fit
FONT_SIZE = 20
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 110, 30, 40, 110  # pixels; MARGIN_TOP grows per title line
ON, OFF, FRAME_LINE, INK, GRID_BG = (25, 25, 60), (242, 242, 242), (220, 40, 40), (0, 0, 0), (255, 255, 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tick_step(num_blocks: int) -> int:
    """Returns a round tick spacing in blocks giving 4 to 12 ticks."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if num_blocks / step <= 12:
            return step
    return 10_000


def block_pixels(rows: int, cols: int) -> int:
    """Returns the side in pixels of one block's square: the plot is at most PLOT_PIXELS, and at
    least MIN_PLOT_PIXELS where that takes no more than PLOT_PIXELS."""
    longest = max(rows, cols)
    return max(1, min(PLOT_PIXELS // longest, max(MIN_PLOT_PIXELS // longest, 2)))


def plot_top(title_lines: int) -> int:
    """Returns the pixel row where the plot starts below `title_lines` lines of title."""
    return MARGIN_TOP + (FONT_SIZE + 8) * title_lines


def block_mask_image(
    block_mask: np.ndarray,
    *,
    frame_tokens: int | None = None,
    num_frames: int = 0,
    block_size: int = 128,
    title: Sequence[str] = (),
) -> np.ndarray:
    """Returns an RGB uint8 image [H, W, 3] of a bool block mask [QB, KB] with axes and legend.

    frame_tokens/num_frames: draw a red line where each latent frame starts (token f *
    frame_tokens falls f * frame_tokens / block_size blocks in); title: lines printed on top.
    """
    from PIL import Image, ImageDraw

    rows, cols = block_mask.shape
    scale = block_pixels(rows, cols)
    font, small = _font(FONT_SIZE), _font(FONT_SIZE - 4)
    frames = bool(frame_tokens) and num_frames > 1
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max([measure.textlength(line, font=font) for line in title]
                     + [_draw_legend(measure, small, 0, frames, frame_tokens)])  # fmt: skip
    top = plot_top(len(title))
    width = MARGIN_LEFT + max(cols * scale, int(text_width)) + MARGIN_RIGHT
    canvas = Image.new("RGB", (width, top + rows * scale + MARGIN_BOTTOM), GRID_BG)
    cells = np.where(block_mask[..., None], np.uint8(ON), np.uint8(OFF)).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(np.repeat(cells, scale, 0), scale, 1)), (MARGIN_LEFT, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((MARGIN_LEFT, 12 + i * (FONT_SIZE + 8)), line, fill=INK, font=font)
    if frame_tokens:
        for f in range(1, num_frames):
            pos = round(f * frame_tokens / block_size * scale)
            if pos < rows * scale:
                draw.line([(MARGIN_LEFT, top + pos), (MARGIN_LEFT + cols * scale - 1, top + pos)], fill=FRAME_LINE)
            if pos < cols * scale:
                draw.line([(MARGIN_LEFT + pos, top), (MARGIN_LEFT + pos, top + rows * scale - 1)], fill=FRAME_LINE)
    draw.rectangle([MARGIN_LEFT - 1, top - 1, MARGIN_LEFT + cols * scale, top + rows * scale], outline=INK)
    _draw_ticks(draw, small, rows, cols, scale, top)
    _draw_axis_labels(canvas, font, rows, cols, scale, top, block_size)
    _draw_legend(draw, small, top + rows * scale + 62, frames, frame_tokens)
    return np.asarray(canvas)


def _draw_ticks(draw, font, rows: int, cols: int, scale: int, top: int) -> None:
    for b in range(0, cols + 1, _tick_step(cols)):
        x = MARGIN_LEFT + b * scale
        draw.line([(x, top + rows * scale), (x, top + rows * scale + 6)], fill=INK)
        label = str(b)
        draw.text((x - draw.textlength(label, font=font) / 2, top + rows * scale + 8), label, fill=INK, font=font)
    for b in range(0, rows + 1, _tick_step(rows)):
        y = top + b * scale
        draw.line([(MARGIN_LEFT - 7, y), (MARGIN_LEFT - 1, y)], fill=INK)  # up to the frame, not into the plot
        label = str(b)
        draw.text((MARGIN_LEFT - 10 - draw.textlength(label, font=font), y - 8), label, fill=INK, font=font)


def _draw_axis_labels(canvas, font, rows: int, cols: int, scale: int, top: int, block_size: int) -> None:
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(canvas)
    x_label = f"key block ({block_size} tokens each)"
    draw.text((MARGIN_LEFT + (cols * scale - draw.textlength(x_label, font=font)) / 2, top + rows * scale + 32),
              x_label, fill=INK, font=font)  # fmt: skip
    y_label = f"query block ({block_size} tokens each)"
    strip = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, FONT_SIZE + 8), GRID_BG)
    ImageDraw.Draw(strip).text((2, 2), y_label, fill=INK, font=font)
    strip = strip.rotate(90, expand=True)
    canvas.paste(strip, (8, max(0, top + (rows * scale - strip.height) // 2)))


def _draw_legend(draw, font, y: int, frames: bool, frame_tokens: int | None) -> int:
    """Draws the legend's entries in a row starting at (MARGIN_LEFT, y); returns its width."""
    x = MARGIN_LEFT
    entries = [(ON, "computed block"), (OFF, "skipped block")]
    if frames:
        entries.append((FRAME_LINE, f"latent frame boundary ({frame_tokens} tokens a frame)"))
    for color, text in entries:
        if color == FRAME_LINE:
            draw.line([(x, y + 9), (x + 18, y + 9)], fill=color, width=3)
        else:
            draw.rectangle([x, y + 1, x + 18, y + 17], fill=color, outline=INK)
        draw.text((x + 26, y), text, fill=INK, font=font)
        x += 26 + int(draw.textlength(text, font=font)) + 30
    return x - 30 - MARGIN_LEFT


def save_block_mask_png(block_mask: np.ndarray, path, **kwargs) -> None:
    """Writes block_mask_image(block_mask, **kwargs) to `path` as a PNG (whatever its extension)."""
    from PIL import Image

    Image.fromarray(block_mask_image(block_mask, **kwargs)).save(path, format="PNG")
