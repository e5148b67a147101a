"""`radial-jax prepare`: videos + captions -> a cache of VAE latents and umT5 contexts, encoded once.

    sources, skipped = find_sources("clips/")            # a folder (NAME.mp4 + NAME.txt) or a .jsonl
    report = prepare_cache(sources, "cache/", PrepareConfig(width=832, height=480, frames=81),
                           load_encoders("wan-1.3b"), skipped=skipped)

The cache folder:
    manifest.json              format, the config used (size, frames, mode, encoders), latent_shape
                               [F, H, W, C], context_dim, text_len, "complete", every sample
                               (id, file, source, caption, window frames) and every skipped video
                               with its reason
    samples/ID.safetensors     "latents" float32 [F, H, W, C] (Wan-normalised VAE mean) and
                               "context" float32 [T, D] (umT5 output on the caption's T tokens,
                               EOS included; the DiT zero-pads it to text_len)
    videos/VID.json            one per finished video: its samples, and the video file's size and
                               mtime and the caption they were made from

Every file is written under a temporary name and renamed into place, so a killed run leaves only
finished samples; a rerun with the same settings skips finished videos (unless the file or the
caption changed since) and retries skipped ones.
A video that cannot be used (unreadable, corrupt, too short, no caption) is skipped with its
reason and never stops the run. train/data.py reads the cache.
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from models import t5
from models.wan import pipeline
from models.wan import vae as vae_lib
from train.video import MODES, TARGET_FPS, VIDEO_SUFFIXES, VideoError, iter_windows

FORMAT = "radial-jax/latent-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES_DIR = "samples"
VIDEOS_DIR = "videos"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What each sample is: width x height pixels, `frames` (4k+1) frames at 16 fps, picked by
    `mode` (train/video.py pick_windows; `windows` is uniform's count)."""

    width: int
    height: int
    frames: int
    mode: str = "head"
    windows: int = 1

    def __post_init__(self):
        pipeline.check_video_size(self.frames, self.height, self.width)
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.windows < 1:
            raise ValueError(f"--windows {self.windows} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Source:
    """One training video: its path, caption and the name it is listed under."""

    video: Path
    caption: str
    name: str


@dataclasses.dataclass
class Encoders:
    """The frozen encoders a cache is made with, and a description of them for the manifest."""

    vae: vae_lib.WanVAE
    text_encoder: t5.UMT5Encoder
    tokenizer: t5.Tokenizer
    description: dict


@dataclasses.dataclass
class PrepareReport:
    written: int  # samples encoded by this run
    reused: int  # samples found finished from an earlier run
    skipped: list[tuple[str, str]]  # (video, reason)
    manifest: Path


def find_sources(src: str | Path) -> tuple[list[Source], list[tuple[str, str]]]:
    """Returns (sources, skipped as (name, reason)) of a folder of videos with sidecar NAME.txt
    captions (searched recursively), or of a JSONL of {"video_path", "caption"} lines (paths
    relative to the file's folder). Raises ValueError for input that is not a dataset at all."""
    src = Path(src)
    if src.is_file() and src.suffix == ".jsonl":
        return _jsonl_sources(src), []
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder or .jsonl file")
    videos = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(src).parts))  # fmt: skip
    if not videos:
        raise ValueError(f"{src}: no videos ({' '.join(VIDEO_SUFFIXES)}) in this folder")
    sources, skipped = [], []
    for video in videos:
        name, caption_file = str(video.relative_to(src)), video.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        if caption:
            sources.append(Source(video, caption, name))
        else:
            skipped.append((name, f"no caption: {caption_file.name} is missing or empty"))
    return sources, skipped


def _jsonl_sources(path: Path) -> list[Source]:
    sources = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("video_path"), str) or not row.get("caption"):
            raise ValueError(f"{path} line {number}: needs {{\"video_path\": ..., \"caption\": ...}} with a "
                             "non-empty caption")  # fmt: skip
        sources.append(Source(path.parent / row["video_path"], str(row["caption"]).strip(), row["video_path"]))
    if not sources:
        raise ValueError(f"{path}: no samples (one JSON object a line: {{\"video_path\", \"caption\"}})")
    return sources


def tiny_encoders(seed: int = 0) -> Encoders:
    """Returns the tiny preset's VAE, umT5 and byte tokenizer: the same seeded random weights as
    `radial-jax generate` without --ckpt (pipeline.tiny_components), so that a cache made with
    them matches the tiny training config."""
    components = pipeline.tiny_components(seed=seed)
    description = {"preset": "tiny", "seed": seed, "z_dim": components.vae.config.z_dim,
                   "text_dim": components.text_encoder.config.dim, "text_len": components.tokenizer.text_len}
    return Encoders(components.vae, components.text_encoder, components.tokenizer, description)  # fmt: skip


def load_encoders(ckpt: str | Path, *, dtype: str | None = None) -> Encoders:
    """Returns the VAE, umT5 and tokenizer of a converted checkpoint folder (radial-jax convert);
    the DiT is not loaded. text_len is the DiT's (read from its config)."""
    from convert import read_config, umt5, wan_vae

    root = Path(ckpt)
    missing = [d for d in (wan_vae.SUBFOLDER, umt5.SUBFOLDER, umt5.TOKENIZER_SUBFOLDER) if not (root / d).is_dir()]
    if missing:
        raise ValueError(f"--ckpt {root}: no {', '.join(d + '/' for d in missing)}; convert the whole Wan2.1 "
                         "folder: radial-jax convert --src WAN_FOLDER --dst NEW_DIR")  # fmt: skip
    _, dit_config = read_config(root)
    vae = wan_vae.load_vae(root)
    text_encoder = umt5.load_umt5(root, dtype=dtype)
    tokenizer = t5.Tokenizer.from_dir(root / umt5.TOKENIZER_SUBFOLDER, text_len=dit_config.text_len)
    description = {"ckpt": str(root.resolve()), "dtype": dtype, "z_dim": vae.config.z_dim,
                   "text_dim": text_encoder.config.dim, "text_len": tokenizer.text_len}  # fmt: skip
    return Encoders(vae, text_encoder, tokenizer, description)


def video_id(source: Source) -> str:
    """Returns a file-name-safe id, unique per source name: readable stem + 8 hex of its hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(Path(source.name).with_suffix("")))[:48]
    return f"{stem}-{hashlib.sha1(source.name.encode()).hexdigest()[:8]}"


def prepare_cache(
    sources: Sequence[Source], out: str | Path, config: PrepareConfig, encoders: Encoders, *,
    skipped: Sequence[tuple[str, str]] = (), progress: bool = True,
) -> PrepareReport:
    """Encodes every source into `out` (see the module docstring) and returns what happened.

    Resumes an earlier run into the same folder (its finished videos are kept), and raises
    ValueError if that run used other settings. `skipped` (from find_sources) is carried into
    the manifest's list.
    """
    out = Path(out)
    header = _header(config, encoders)
    _start(out, config, header)
    skipped = list(skipped)
    samples, written, reused = [], 0, 0
    bar = _progress(len(sources), progress)
    try:
        for source in sources:
            record = _finished(out, source)
            if record is None:
                try:
                    record = _encode_video(out, source, config, encoders)
                    written += len(record["samples"])
                except VideoError as e:
                    skipped.append((source.name, str(e)))
            else:
                reused += len(record["samples"])
            if record is not None:
                samples += [{**s, "source": source.name, "caption": source.caption} for s in record["samples"]]
            bar.set_postfix_str(f"{len(samples)} samples, {len(skipped)} skipped")
            bar.update(1)
    finally:
        bar.close()
    manifest = {**header, "complete": True, "num_samples": len(samples), "samples": samples,
                "skipped": [{"source": name, "reason": reason} for name, reason in skipped]}  # fmt: skip
    _write_json(out / MANIFEST, manifest)
    return PrepareReport(written, reused, skipped, out / MANIFEST)


def _header(config: PrepareConfig, encoders: Encoders) -> dict:
    z_dim = encoders.vae.config.z_dim
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "config": {**dataclasses.asdict(config), "fps": TARGET_FPS, "encoders": encoders.description},
        "latent_shape": list(pipeline.latent_shape(config.frames, config.height, config.width, z_dim)[1:]),
        "context_dim": encoders.description["text_dim"], "text_len": encoders.tokenizer.text_len,
    }  # fmt: skip


def check_out(out: str | Path, config: PrepareConfig, encoders: dict | None = None) -> None:
    """Raises ValueError unless `out` is new, empty, or a cache made with the same settings (and,
    given their description, the same encoders): what prepare_cache would refuse, checked before
    minutes of loading encoders."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        settings = {k: v for k, v in (old.get("config") or {}).items() if k != "encoders"}
        same = settings == {**dataclasses.asdict(config), "fps": TARGET_FPS}
        if old.get("format") != FORMAT or not same or (encoders is not None and old["config"]["encoders"] != encoders):
            raise ValueError(f"--out {out} holds a cache made with other settings ({_describe(old.get('config'))}); "
                             "rerun with those or give a new --out")  # fmt: skip
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not a latent cache; give a new or empty folder")


def _start(out: Path, config: PrepareConfig, header: dict) -> None:
    """Creates the folders, or checks that an earlier run used the same settings; marks the
    manifest incomplete until this run finishes; removes temporaries a killed run left."""
    check_out(out, config, header["config"]["encoders"])
    for sub in (SAMPLES_DIR, VIDEOS_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for stale in (out / sub).glob(".*.tmp"):
            stale.unlink()
    _write_json(out / MANIFEST, {**header, "complete": False})


def _describe(config: dict | None) -> str:
    if not config:
        return "unknown"
    enc = config.get("encoders", {})
    return (f"--size {config.get('width')}x{config.get('height')} --frames {config.get('frames')} "
            f"--mode {config.get('mode')} --windows {config.get('windows')}, encoders "
            f"{enc.get('ckpt') or enc.get('preset')}")  # fmt: skip


def _finished(out: Path, source: Source) -> dict | None:
    """Returns the record of a video an earlier run finished, if its sample files are all there
    and the video file and caption are unchanged since."""
    path = out / VIDEOS_DIR / f"{video_id(source)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != _fingerprint(source):
        return None
    if not all((out / s["file"]).is_file() for s in record["samples"]):
        return None
    return record


def _fingerprint(source: Source) -> dict:
    """What a finished video's samples depend on besides the settings: its file and caption."""
    stat = source.video.stat() if source.video.is_file() else None
    return {"caption": source.caption, "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}


def _encode_video(out: Path, source: Source, config: PrepareConfig, encoders: Encoders) -> dict:
    """Decodes one video window by window, encodes and writes each as a sample, then its record.
    A video that fails part-way leaves none of its samples behind."""
    from safetensors.numpy import save_file

    vid, context, samples, fingerprint = video_id(source), None, [], _fingerprint(source)
    windows = iter_windows(source.video, width=config.width, height=config.height, length=config.frames,
                           mode=config.mode, windows=config.windows)  # fmt: skip
    try:
        for number, (window, frames) in enumerate(_decoding_errors(windows)):
            if context is None:  # once a video, and only for one that decodes
                context = _encode_caption(encoders, source.caption)
            pixels = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0  # [1, F, H, W, 3] in [-1, 1]
            latents = np.asarray(vae_lib.encode(encoders.vae, pixels)[0], np.float32)
            sample_id = f"{vid}-{number:03d}"
            file = f"{SAMPLES_DIR}/{sample_id}.safetensors"
            metadata = {"source": source.name, "caption": source.caption, "frames": f"{window[0]}:{window[-1] + 1}"}
            _atomic(out / file, lambda tmp: save_file({"latents": latents, "context": context}, str(tmp), metadata))
            samples.append({"id": sample_id, "file": file, "window": number,
                            "frames": [int(window[0]), int(window[-1]) + 1], "text_tokens": int(context.shape[0])})
    except VideoError:
        for sample in samples:
            (out / sample["file"]).unlink(missing_ok=True)
        raise
    record = {"source": source.name, "fingerprint": fingerprint, "samples": samples}
    _write_json(out / VIDEOS_DIR / f"{vid}.json", record)
    return record


def _decoding_errors(windows: Iterator) -> Iterator:
    """The windows; a decoder or image library failing on odd input becomes this video's
    VideoError (errors of the encoders, between the windows, still stop the run)."""
    while True:
        try:
            item = next(windows)
        except StopIteration:
            return
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"cannot decode ({type(e).__name__}: {e})") from None
        yield item


def _encode_caption(encoders: Encoders, caption: str) -> np.ndarray:
    """Returns umT5's context float32 [T, D] on the caption's tokens (EOS included), T <= text_len."""
    ids, mask = encoders.tokenizer([caption])
    context = t5.encode_text(encoders.text_encoder, ids, mask)[0]
    return np.asarray(context[: int(mask.sum())], np.float32)


def _atomic(path: Path, write) -> None:
    """Runs write(temporary path), then renames it to `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, value: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n"))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="video", desc="prepare", disable=not enabled)
