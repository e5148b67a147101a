"""Videos for training: decode, resample to Wan's 16 fps, pick frame windows, resize and crop;
and a synthetic dataset of moving shapes for tests and the demo.

    for window, frames in iter_windows("clip.mp4", width=832, height=480, length=81, mode="chunked"):
        ...   # window: int [81] indices into the 16 fps clip; frames: uint8 [81, 480, 832, 3]

Decoding goes through imageio-ffmpeg (ffmpeg's own decoders: mp4, webm, mov, ...), one frame at
a time: a frame is resized as soon as it is decoded and kept only while a window still needs it,
so memory holds about one window at the target size, never the source at full resolution nor
a whole long video. Resampling uses the nominal frame rate (a variable-rate video is treated as
constant-rate): output frame k, at time k / 16 s, is the source frame on screen at that time,
floor(k * source_fps / 16). Slower sources repeat frames, faster ones drop them.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

TARGET_FPS = 16  # Wan2.1 trains and samples at 16 fps
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MODES = ("head", "uniform", "chunked")
_EPS = 1e-9  # k * fps / target lands exactly on an integer in exact arithmetic; floats may fall short


class VideoError(ValueError):
    """A video that cannot be used (unreadable, corrupt, too short); the message is the reason."""


def source_index(k: int, source_fps: float, target_fps: float | int = TARGET_FPS) -> int:
    """Returns the source frame shown at output frame k's time, k / target_fps seconds."""
    return math.floor(k * source_fps / target_fps + _EPS)


def resample_indices(num_source: int, source_fps: float, target_fps: float | int = TARGET_FPS) -> np.ndarray:
    """Returns int [n] source frame indices of a num_source-frame clip resampled to target_fps:
    one per output frame whose time falls inside the clip."""
    if source_fps <= 0:
        raise VideoError(f"frame rate {source_fps} is not positive")
    out = []
    while (i := source_index(len(out), source_fps, target_fps)) < num_source:
        out.append(i)
    return np.asarray(out, np.int64)


def pick_windows(num_frames: int, length: int, mode: str, windows: int = 1) -> list[np.ndarray]:
    """Returns the frame windows (int arrays [length], indices into the resampled clip) to train on.

    head: the first `length` frames; uniform: `windows` windows with evenly spread starts (the
    first at 0, the last ending at the clip's end); chunked: every non-overlapping window from the
    start. Raises VideoError when the clip is shorter than one window.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if num_frames < length:
        raise VideoError(f"too short: {num_frames} frames at {TARGET_FPS} fps, needs {length}")
    if mode == "head":
        starts = [0]
    elif mode == "uniform":
        if windows < 1:
            raise ValueError(f"windows={windows} must be >= 1")
        starts = sorted(set(np.round(np.linspace(0, num_frames - length, windows)).astype(int).tolist()))
    else:
        starts = range(0, num_frames - length + 1, length)
    return [np.arange(start, start + length) for start in starts]


def resize_center_crop(frame: UInt8[np.ndarray, "h w 3"], width: int, height: int) -> UInt8[np.ndarray, "H W 3"]:
    """Returns the frame scaled (bicubic) so that it covers width x height, then centre-cropped
    to it: uint8 [height, width, 3]. Aspect ratio is kept; what sticks out is cut."""
    from PIL import Image

    h, w = frame.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    image = Image.fromarray(frame)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def read_video(
    path: str | Path, *, width: int, height: int, max_frames: int | None = None, target_fps: float | int = TARGET_FPS
) -> tuple[UInt8[np.ndarray, "n H W 3"], float]:
    """Returns (the clip resampled to target_fps, resized and centre-cropped: uint8 [n, height,
    width, 3]; the source frame rate). max_frames: stop decoding after that many output frames.
    Raises VideoError (reason in the message) for a file ffmpeg cannot read."""
    frames, source_fps = [], 0.0
    with contextlib.closing(_resampled_frames(Path(path), target_fps)) as decoded:  # closes ffmpeg on an early stop
        for frame, source_fps in decoded:
            frames.append(resize_center_crop(frame, width, height))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoError("no frames could be decoded")
    return np.stack(frames), source_fps


def iter_windows(
    path: str | Path, *, width: int, height: int, length: int, mode: str, windows: int = 1
) -> Iterator[tuple[np.ndarray, UInt8[np.ndarray, "L H W 3"]]]:
    """Yields (indices into the 16 fps clip, int [length]; the window's frames, uint8 [length,
    height, width, 3]) for each window pick_windows chooses, in order.

    Decodes the video once (uniform first counts its frames with a decode-only ffmpeg pass) and
    holds only frames of windows not yet complete: memory is about one window whatever the
    video's length. Raises VideoError for an unreadable video or one shorter than one window.
    """
    path = Path(path)
    if mode == "uniform":
        planned = iter(pick_windows(_count_resampled(path), length, mode, windows))
    elif mode == "head":
        planned = iter([np.arange(length)])
    elif mode == "chunked":
        planned = (np.arange(start, start + length) for start in itertools.count(0, length))
    else:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    window, kept, decoded_frames, yielded = next(planned), {}, 0, 0
    with contextlib.closing(_resampled_frames(path, TARGET_FPS)) as decoded:
        for i, (frame, _) in enumerate(decoded):
            decoded_frames = i + 1
            if i >= window[0]:  # windows come in order of start: earlier frames are never needed again
                kept[i] = resize_center_crop(frame, width, height)
            if i == window[-1]:
                yield window, np.stack([kept[j] for j in window])
                yielded += 1
                window = next(planned, None)
                if window is None:
                    break
                kept = {j: f for j, f in kept.items() if j >= window[0]}
    if not yielded:
        raise VideoError(f"too short: {decoded_frames} frames at {TARGET_FPS} fps, needs {length}")


def _count_resampled(path: Path) -> int:
    """Returns the number of frames the video has at 16 fps (ffmpeg decodes it once, discarding)."""
    import imageio_ffmpeg

    fps = _source_fps(path)
    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (OSError, RuntimeError) as e:
        raise VideoError(f"ffmpeg cannot count its frames ({_ffmpeg_reason(e)})") from None
    return len(resample_indices(count, fps))


def _source_fps(path: Path) -> float:
    with contextlib.closing(_resampled_frames(path, TARGET_FPS)) as decoded:
        for _, fps in decoded:
            return fps
    raise VideoError("no frames could be decoded")


def _resampled_frames(path: Path, target_fps: float | int) -> Iterator[tuple[np.ndarray, float]]:
    """Yields (uint8 [h, w, 3] frame, source fps) for each output frame at target_fps, decoding
    the source once, in order."""
    import imageio_ffmpeg

    if not path.is_file():
        raise VideoError("no such file")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        try:
            with warnings.catch_warnings(), _quiet_size_notice():  # JAX warns on any fork; the child execs ffmpeg
                warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
                meta = next(reader)
        except (OSError, RuntimeError, StopIteration) as e:
            raise VideoError(f"ffmpeg cannot read it ({_ffmpeg_reason(e)})") from None
        fps, (w, h) = float(meta.get("fps") or 0.0), meta["size"]
        if not fps > 0:
            raise VideoError("ffmpeg reports no frame rate")
        k = 0
        for i, raw in enumerate(_frames(reader)):
            if len(raw) != w * h * 3:
                raise VideoError(f"frame {i} has {len(raw)} bytes, expected {w}x{h}x3")
            frame = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            while source_index(k, fps, target_fps) == i:
                yield frame, fps
                k += 1
    finally:
        reader.close()


@contextlib.contextmanager
def _quiet_size_notice():
    """Silences imageio-ffmpeg's warning that a rotated video's frames differ in size from its
    stream (ffmpeg's autorotate, what we want) for the duration of the block."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return "different from the source frame size" not in record.getMessage()

    logger = logging.getLogger("imageio_ffmpeg")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _frames(reader) -> Iterator[bytes]:
    """The reader's frames; a decoding failure mid-stream becomes a VideoError."""
    try:
        yield from reader
    except (OSError, RuntimeError) as e:
        raise VideoError(f"decoding failed ({_ffmpeg_reason(e)})") from None


def _ffmpeg_reason(error: Exception) -> str:
    """The most telling line of an imageio-ffmpeg error: ffmpeg's last stderr line if any."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    tail = [line for line in lines if not line.startswith(("ffmpeg version", "built with", "configuration", "lib"))]
    return (tail[-1] if tail else type(error).__name__)[:200]


# ---------------------------------------------------------------- synthetic dataset

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (240, 210, 40),
           "white": (245, 245, 245), "purple": (150, 60, 200)}  # fmt: skip
BACKGROUNDS = {"black": (10, 10, 10), "grey": (120, 120, 120), "dark blue": (15, 25, 70)}
SHAPES = ("circle", "square")
SYNTHETIC_MARKER = "synthetic.json"  # the settings a synthetic folder was written with
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}


@dataclasses.dataclass(frozen=True)
class ShapeClip:
    """One synthetic clip: a shape of a colour crossing a plain background in a straight line."""

    shape: str
    colour: str
    background: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moves from {self.direction} on a {self.background} background"


def shape_clip_frames(clip: ShapeClip, *, frames: int, width: int, height: int) -> UInt8[np.ndarray, "F H W 3"]:
    """Returns the clip's frames, uint8 [frames, height, width, 3]: the shape (diameter a third of
    the shorter side) crosses the frame centre-line from one edge to the other."""
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUNDS[clip.background]
    radius = min(width, height) / 6
    dx, dy = DIRECTIONS[clip.direction]
    y, x = np.mgrid[:height, :width] + 0.5
    for f in range(frames):
        t = f / max(frames - 1, 1)  # 0 -> 1 across the clip
        cx = width / 2 + dx * (t - 0.5) * (width - 2 * radius)
        cy = height / 2 + dy * (t - 0.5) * (height - 2 * radius)
        if clip.shape == "circle":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        else:
            inside = (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
        video[f][inside] = COLOURS[clip.colour]
    return video


def write_synthetic_dataset(
    folder: str | Path, count: int, *, frames: int = 33, width: int = 192, height: int = 128,
    fps: float | int = TARGET_FPS, seed: int = 0,
) -> list[Path]:
    """Writes `count` clips NAME.mp4 (libx264) with captions NAME.txt into `folder`, and
    synthetic.json with these settings; returns the video paths. Deterministic for a seed. A
    folder that already holds the same synthetic set is reused as it is (a rerun of the same
    command); one holding other videos is refused."""
    if count < 1:
        raise ValueError(f"--synthetic {count} must be >= 1")
    if width % 2 or height % 2:
        raise ValueError(f"synthetic size {width}x{height} must be even (H.264 4:2:0)")
    folder = Path(folder)
    settings = {"count": count, "frames": frames, "width": width, "height": height, "fps": fps, "seed": seed}
    paths = [folder / f"shapes_{n:04d}.mp4" for n in range(count)]
    marker = folder / SYNTHETIC_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings and all(p.is_file() for p in paths):
        return paths
    if folder.is_dir() and any(p.suffix.lower() in VIDEO_SUFFIXES for p in folder.iterdir()):
        raise ValueError(f"{folder} already holds other videos; give --synthetic an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in paths:
        clip = ShapeClip(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                         list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                         list(DIRECTIONS)[rng.integers(len(DIRECTIONS))])  # fmt: skip
        write_mp4(path, shape_clip_frames(clip, frames=frames, width=width, height=height), fps)
        path.with_suffix(".txt").write_text(clip.caption + "\n")
    marker.write_text(json.dumps(settings) + "\n")  # last: a killed run is not mistaken for a finished one
    return paths


def write_mp4(path: str | Path, video: UInt8[np.ndarray, "F H W 3"], fps: float | int) -> None:
    """Writes uint8 [F, H, W, 3] frames as an H.264 mp4 (near-lossless quality), through a temporary
    file renamed into place."""
    import imageio_ffmpeg

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with warnings.catch_warnings():  # JAX warns on any fork; this child only execs ffmpeg
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        writer = imageio_ffmpeg.write_frames(str(tmp), (video.shape[2], video.shape[1]), fps=fps, codec="libx264",
                                             quality=9, macro_block_size=1, ffmpeg_log_level="error")  # fmt: skip
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame).tobytes())
        writer.close()
    tmp.replace(path)
