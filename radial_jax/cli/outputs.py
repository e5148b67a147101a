"""Files the commands write: checked before any work starts, written under a temporary name
beside the destination and renamed into place, so a failure or Ctrl-C never leaves half a file."""

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

# What imageio-ffmpeg writes with the libx264 codec `generate` uses (webm needs VP8/VP9, gif is
# no libx264 container, .m4v/.flv/.ts have no imageio writer: each checked by hand).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")


def check_output_file(path: str, flag: str, suffixes: tuple[str, ...]) -> Path:
    """Returns `path` as a Path, or raises ValueError saying what is wrong with it as an output.

    The file may exist (it is replaced); its folder must exist and be writable, and its
    extension must be one of `suffixes` (compared case-insensitively).
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {out / ('out' + suffixes[0])}")
    if out.suffix.lower() not in suffixes:
        what = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise ValueError(f"{flag} {path}: {what}; use one of {', '.join(suffixes)}")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")
    return out


def partial_name(out: Path) -> Path:
    """Returns a fresh hidden name beside `out` with the same extension (writers pick the format by it)."""
    return out.with_name(f".{out.stem}.partial-{secrets.token_hex(4)}{out.suffix}")


@contextlib.contextmanager
def replaced_atomically(out: Path) -> Iterator[Path]:
    """Yields a temporary path beside `out`; renames it to `out` when the block succeeds, deletes
    it on any failure (including KeyboardInterrupt), so `out` is either complete or untouched."""
    partial = partial_name(out)
    try:
        yield partial
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_video(video, out: Path, fps: int) -> None:
    """Writes uint8 numpy [frames, H, W, 3] to `out` (format by extension) under a temporary name,
    then renames."""
    import imageio.v2 as imageio

    with replaced_atomically(out) as partial, warnings.catch_warnings():
        # JAX warns on any fork; imageio's child only execs ffmpeg.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        imageio.mimwrite(partial, list(video), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                         ffmpeg_log_level="error")  # fmt: skip
