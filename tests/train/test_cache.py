"""`radial-jax prepare`'s cache (train/cache.py): good videos cached, bad ones listed with a reason,
reruns resume, a killed run leaves nothing half-written; cached latents against the VAE run on
frames read by an independent decoder path (imageio's ffmpeg plugin)."""

import json
from pathlib import Path

import imageio.v3 as iio
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import t5
from models.wan import vae as vae_lib
from train import cache as cache_lib
from train.cache import PrepareConfig, find_sources, prepare_cache, tiny_encoders
from train.data import CacheError, LatentDataset
from train.video import write_mp4, write_synthetic_dataset

CONFIG = PrepareConfig(width=64, height=64, frames=9, mode="chunked")  # latents [3, 8, 8, 16]
SOURCE_SIZE = (96, 64)  # width, height: the centre crop keeps columns 16..79


@pytest.fixture(scope="module")
def encoders():
    return tiny_encoders(seed=0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two good clips (20 frames: 2 windows each), a corrupt file, a too-short clip and a clip without caption."""
    folder = tmp_path_factory.mktemp("videos")
    write_synthetic_dataset(folder, 2, frames=20, width=SOURCE_SIZE[0], height=SOURCE_SIZE[1], seed=1)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    (folder / "corrupt.txt").write_text("a corrupt file")
    write_mp4(folder / "short.mp4", np.zeros((5, 64, 96, 3), np.uint8), 16)
    (folder / "short.txt").write_text("too short")
    write_mp4(folder / "nocaption.mp4", np.zeros((12, 64, 96, 3), np.uint8), 16)
    return folder


@pytest.fixture(scope="module")
def prepared(videos, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    sources, skipped = find_sources(videos)
    report = prepare_cache(sources, out, CONFIG, encoders, skipped=skipped, progress=False)
    return out, report


def test_prepare_caches_the_good_videos_and_lists_the_bad_ones_with_reasons(prepared):
    out, report = prepared
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["corrupt.mp4", "nocaption.mp4", "short.mp4"]
    assert "ffmpeg cannot read it" in reasons["corrupt.mp4"]
    assert reasons["short.mp4"] == "too short: 5 frames at 16 fps, needs 9"
    assert "nocaption.txt is missing" in reasons["nocaption.mp4"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == report.written == 4  # 2 videos x 2 windows
    assert {s["source"] for s in manifest["samples"]} == {"shapes_0000.mp4", "shapes_0001.mp4"}
    assert [s["frames"] for s in manifest["samples"][:2]] == [[0, 9], [9, 18]]
    assert {s["source"] for s in manifest["skipped"]} == set(reasons)
    assert manifest["latent_shape"] == [3, 8, 8, 16]
    assert manifest["config"]["encoders"]["preset"] == "tiny"
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        s["id"] + ".safetensors" for s in manifest["samples"])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio starts ffmpeg; JAX warns on any fork
def test_cached_latents_are_the_vae_encoding_of_the_cropped_window(prepared, encoders, videos):
    out, _ = prepared
    sample = json.loads((out / "manifest.json").read_text())["samples"][1]  # the second window of a clip
    cached = load_file(str(out / sample["file"]))
    pixels = iio.imread(videos / sample["source"], plugin="FFMPEG")  # [20, 64, 96, 3], 16 fps: no resampling
    start, stop = sample["frames"]
    window = pixels[start:stop, :, 16:80]  # centre crop 96 -> 64, no scaling
    expected = vae_lib.encode(encoders.vae, jnp.asarray(window, jnp.float32)[None] / 127.5 - 1.0)[0]
    np.testing.assert_allclose(cached["latents"], np.asarray(expected), rtol=0, atol=1e-5)


def test_cached_context_is_the_captions_umt5_output_on_its_tokens(prepared, encoders, videos):
    out, _ = prepared
    sample = json.loads((out / "manifest.json").read_text())["samples"][0]
    caption = (videos / sample["source"]).with_suffix(".txt").read_text().strip()
    assert sample["caption"] == caption
    ids, mask = encoders.tokenizer([caption])
    full = np.asarray(t5.encode_text(encoders.text_encoder, ids, mask)[0])
    tokens = min(len(caption.encode()) + 1, encoders.tokenizer.text_len)  # byte tokenizer: bytes + EOS, capped
    cached = load_file(str(out / sample["file"]))["context"]
    assert cached.shape == (tokens, full.shape[-1]) == (sample["text_tokens"], full.shape[-1])
    np.testing.assert_allclose(cached, full[:tokens], rtol=0, atol=1e-6)


def test_rerun_skips_finished_samples_and_redoes_a_lost_one(prepared, videos, encoders):
    out, _ = prepared
    files = sorted((out / "samples").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    sources, skipped = find_sources(videos)
    again = prepare_cache(sources, out, CONFIG, encoders, skipped=skipped, progress=False)
    assert (again.written, again.reused) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()} == stamps
    files[0].unlink()  # a lost sample: its video is encoded again, the other video is not
    third = prepare_cache(sources, out, CONFIG, encoders, skipped=skipped, progress=False)
    assert (third.written, third.reused) == (2, 2)
    assert len(LatentDataset(out)) == 4


def test_rerun_encodes_again_a_video_whose_caption_changed(videos, encoders, tmp_path):
    import shutil

    folder = tmp_path / "one"
    folder.mkdir()
    for suffix in (".mp4", ".txt"):
        shutil.copy(videos / f"shapes_0000{suffix}", folder / f"clip{suffix}")
    first = prepare_cache(find_sources(folder)[0], tmp_path / "cache", CONFIG, encoders, progress=False)
    before = load_file(str(tmp_path / "cache" / json.loads(first.manifest.read_text())["samples"][0]["file"]))
    (folder / "clip.txt").write_text("a different caption")
    again = prepare_cache(find_sources(folder)[0], tmp_path / "cache", CONFIG, encoders, progress=False)
    assert (again.written, again.reused) == (2, 0)
    sample = json.loads(again.manifest.read_text())["samples"][0]
    after = load_file(str(tmp_path / "cache" / sample["file"]))
    assert sample["caption"] == "a different caption" and before["context"].shape != after["context"].shape
    np.testing.assert_array_equal(before["latents"], after["latents"])


def test_a_killed_run_leaves_only_finished_samples_and_resumes(videos, encoders, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    sources, _ = find_sources(videos)
    real_encode, calls = vae_lib.encode, []

    def encode_then_die(vae, video):
        calls.append(1)
        if len(calls) == 3:  # the first window of the second video
            raise KeyboardInterrupt
        return real_encode(vae, video)

    monkeypatch.setattr(vae_lib, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(sources, out, CONFIG, encoders, progress=False)
    assert len(list((out / "samples").glob("*.safetensors"))) == 2
    with pytest.raises(CacheError, match="unfinished"):
        LatentDataset(out)
    monkeypatch.setattr(vae_lib, "encode", real_encode)
    resumed = prepare_cache(sources, out, CONFIG, encoders, progress=False)
    assert (resumed.written, resumed.reused) == (2, 2)
    assert len(LatentDataset(out)) == 4


def test_prepare_into_a_cache_made_with_other_settings_is_refused(prepared, videos, encoders):
    out, _ = prepared
    sources, _ = find_sources(videos)
    other = PrepareConfig(width=64, height=64, frames=5, mode="chunked")
    with pytest.raises(ValueError, match="holds a cache made with other settings .*--frames 9"):
        prepare_cache(sources, out, other, encoders, progress=False)


def test_jsonl_sources_resolve_paths_beside_the_file(videos, tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"video_path": str(videos / "shapes_0000.mp4"), "caption": " a clip "}) + "\n\n"
                       + json.dumps({"video_path": "clips/b.mp4", "caption": "b"}) + "\n")  # fmt: skip
    sources, skipped = find_sources(listing)
    assert [(s.video, s.caption) for s in sources] == [(videos / "shapes_0000.mp4", "a clip"),
                                                       (tmp_path / "clips/b.mp4", "b")]  # fmt: skip
    assert skipped == []


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such folder or .jsonl file"),
    (lambda p: p, "no videos"),
    (lambda p: (p / "a.jsonl").write_text('{"video_path": "a.mp4", "caption": "x"}\n{oops\n') and p / "a.jsonl",
     "a.jsonl line 2: not JSON"),
    (lambda p: (p / "b.jsonl").write_text('{"video": "a.mp4"}\n') and p / "b.jsonl", "b.jsonl line 1: needs"),
])  # fmt: skip
def test_find_sources_bad_input_is_one_clear_error(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        find_sources(make(tmp_path))


@pytest.mark.parametrize("fields, message", [
    (dict(width=64, height=64, frames=8), "frames=8 must be 4k\\+1"),
    (dict(width=60, height=64, frames=9), "size 60x64"),
    (dict(width=64, height=64, frames=9, mode="random"), "--mode 'random'"),
])  # fmt: skip
def test_prepare_config_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        PrepareConfig(**fields)


def test_video_ids_are_unique_per_source_name():
    a = cache_lib.Source(video=Path("src/a/b.mp4"), caption="x", name="a/b.mp4")
    b = cache_lib.Source(video=Path("src/a_b.mp4"), caption="x", name="a_b.mp4")
    assert cache_lib.video_id(a) != cache_lib.video_id(b)
    assert cache_lib.video_id(a).startswith("a_b-")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_prepare_with_a_converted_checkpoint_uses_its_encoders(videos, tmp_path):
    """--ckpt: latents against diffusers' AutoencoderKLWan and contexts against transformers' umT5,
    the same random torch modules the checkpoint was converted from."""
    import torch
    from pipeline_testing import diffusers_folder, tiny_umt5, tiny_vae

    from convert import convert_checkpoint

    convert_checkpoint(diffusers_folder(tmp_path / "src"), tmp_path / "ckpt", dtype="f32", progress=False)
    encoders = cache_lib.load_encoders(tmp_path / "ckpt")
    source = [s for s in find_sources(videos)[0] if s.name == "shapes_0001.mp4"]
    report = prepare_cache(source, tmp_path / "cache", CONFIG, encoders, progress=False)
    manifest = json.loads(report.manifest.read_text())
    assert manifest["config"]["encoders"]["ckpt"] == str((tmp_path / "ckpt").resolve())
    assert (manifest["context_dim"], manifest["text_len"]) == (32, 512)  # the tiny umT5's width, the DiT's text_len
    sample = manifest["samples"][1]
    cached = load_file(str(tmp_path / "cache" / sample["file"]))

    vae = tiny_vae()
    start, stop = sample["frames"]
    window = iio.imread(videos / sample["source"], plugin="FFMPEG")[start:stop, :, 16:80]
    video = torch.from_numpy(window.astype(np.float32) / 127.5 - 1.0).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    with torch.no_grad():
        mean = vae.encode(video).latent_dist.mean[0].permute(1, 2, 3, 0).numpy()  # [F, H, W, C]
    expected = (mean - np.asarray(vae.config.latents_mean)) / np.asarray(vae.config.latents_std)
    np.testing.assert_allclose(cached["latents"], expected, rtol=0, atol=1e-4 * np.abs(expected).max())

    ids, mask = encoders.tokenizer([sample["caption"]])
    with torch.no_grad():
        hidden = tiny_umt5()(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    tokens = int(mask.sum())
    expected_context = hidden.last_hidden_state[0, :tokens].numpy()
    assert cached["context"].shape == (tokens, 32) and tokens == sample["text_tokens"]
    np.testing.assert_allclose(cached["context"], expected_context, rtol=0, atol=1e-4 * np.abs(expected_context).max())
