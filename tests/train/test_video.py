"""Video decoding, 16 fps resampling, frame windows and resize/crop (train/video.py), checked
against hand-computed indices and frames whose pixel values encode their source index."""

import numpy as np
import pytest

from train.video import (
    ShapeClip, VideoError, iter_windows, pick_windows, read_video, resample_indices, resize_center_crop,
    shape_clip_frames, write_mp4, write_synthetic_dataset,
)  # fmt: skip

LEVEL = 8  # grey level per source frame index in the numbered clips


def test_resample_indices_match_hand_computed():
    # output frame k shows source frame floor(k * fps / 16)
    assert resample_indices(10, 30.0).tolist() == [0, 1, 3, 5, 7, 9]  # 0, 1.875, 3.75, 5.625, 7.5, 9.375
    assert resample_indices(8, 24.0).tolist() == [0, 1, 3, 4, 6, 7]  # steps of 1.5
    assert resample_indices(3, 8.0).tolist() == [0, 0, 1, 1, 2, 2]  # slower source: each frame twice
    assert resample_indices(5, 16.0).tolist() == [0, 1, 2, 3, 4]
    assert resample_indices(6, 29.97).tolist() == [0, 1, 3, 5]  # 1.873, 3.746, 5.619


def _numbered_clip(path, frames: int, fps: float, size=(48, 32)):
    """Writes a clip whose frame i is flat grey LEVEL * i."""
    width, height = size
    video = np.stack([np.full((height, width, 3), LEVEL * i, np.uint8) for i in range(frames)])
    write_mp4(path, video, fps)
    return path


def _source_indices(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / LEVEL)) for f in frames]


@pytest.mark.parametrize("fps, expected", [(24.0, [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28]),
                                           (10.0, [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8, 9, 10, 10, 11, 11,
                                                   12, 13, 13, 14, 15, 15, 16, 16, 17, 18, 18, 19, 20, 20, 21, 21,
                                                   22, 23, 23, 24, 25, 25, 26, 26, 27, 28, 28, 29])])  # fmt: skip
def test_read_video_resamples_to_16fps(tmp_path, fps, expected):
    path = _numbered_clip(tmp_path / "numbered.mp4", 30, fps)
    frames, source_fps = read_video(path, width=48, height=32)
    assert source_fps == fps
    assert _source_indices(frames) == expected == resample_indices(30, fps).tolist()


def test_read_video_stops_after_max_frames(tmp_path):
    frames, _ = read_video(_numbered_clip(tmp_path / "n.mp4", 30, 24.0), width=48, height=32, max_frames=5)
    assert _source_indices(frames) == [0, 1, 3, 4, 6]


def test_pick_windows_head_uniform_chunked():
    assert [w.tolist() for w in pick_windows(31, 9, "head")] == [list(range(0, 9))]
    assert [w[0] for w in pick_windows(31, 9, "uniform", windows=3)] == [0, 11, 22]  # starts spread over 0..31-9
    assert [w[0] for w in pick_windows(31, 9, "chunked")] == [0, 9, 18]  # 27..35 does not fit
    assert [w[0] for w in pick_windows(9, 9, "chunked")] == [0]
    assert all(len(w) == 9 and np.all(np.diff(w) == 1) for w in pick_windows(100, 9, "uniform", windows=4))


def test_pick_windows_refuses_a_clip_shorter_than_one_window():
    with pytest.raises(VideoError, match="too short: 8 frames at 16 fps, needs 9"):
        pick_windows(8, 9, "uniform", windows=2)


@pytest.mark.parametrize("length, mode, windows, starts", [
    (5, "head", 1, [0]),
    (5, "chunked", 1, [0, 5, 10, 15]),
    (9, "uniform", 4, [0, 4, 7, 11]),  # overlapping windows: starts round(linspace(0, 20 - 9, 4))
])  # fmt: skip
def test_iter_windows_decodes_the_picked_windows(tmp_path, length, mode, windows, starts):
    path = _numbered_clip(tmp_path / "numbered.mp4", 30, 24.0)  # 20 frames at 16 fps
    resampled = resample_indices(30, 24.0)
    got = list(iter_windows(path, width=48, height=32, length=length, mode=mode, windows=windows))
    assert [w[0] for w, _ in got] == starts == [w[0] for w in pick_windows(20, length, mode, windows)]
    for window, frames in got:
        assert frames.shape == (length, 32, 48, 3)
        assert _source_indices(frames) == resampled[window].tolist()
    assert _source_indices(got[-1][1]) == {"head": [0, 1, 3, 4, 6], "chunked": [22, 24, 25, 27, 28],
                                           "uniform": [16, 18, 19, 21, 22, 24, 25, 27, 28]}[mode]  # fmt: skip


def test_iter_windows_refuses_a_clip_shorter_than_one_window(tmp_path):
    path = _numbered_clip(tmp_path / "numbered.mp4", 30, 24.0)
    for mode in ("head", "chunked", "uniform"):
        with pytest.raises(VideoError, match="too short: 20 frames at 16 fps, needs 21"):
            list(iter_windows(path, width=48, height=32, length=21, mode=mode))


def test_resize_center_crop_keeps_the_middle_of_a_wide_frame():
    # 100 x 50 frame: red | green (columns 25..74) | blue; to 40 x 40 it scales by 0.8 (height
    # fits) to 80 x 40 and keeps columns 20..59, which are source columns 25..74: all green.
    frame = np.zeros((50, 100, 3), np.uint8)
    frame[:, :25, 0] = frame[:, 25:75, 1] = frame[:, 75:, 2] = 255
    out = resize_center_crop(frame, 40, 40)
    assert out.shape == (40, 40, 3)
    inner = out[:, 2:-2].astype(int)  # bicubic blends the colours across one or two pixels
    assert np.all(inner[..., 1] >= 250) and np.all(inner[..., [0, 2]] <= 5)


def test_resize_center_crop_of_a_tall_frame_cuts_top_and_bottom():
    frame = np.zeros((120, 30, 3), np.uint8)
    frame[:40, :, 0] = frame[40:80, :, 1] = frame[80:, :, 2] = 255
    out = resize_center_crop(frame, 60, 40)  # scale 2 (width fits): 60 x 240, rows 100..139 = source 50..69
    assert out.shape == (40, 60, 3)
    assert np.all(out[..., 1] >= 250) and np.all(out[..., [0, 2]] <= 5)


def test_read_video_reports_unreadable_files(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoError, match="ffmpeg cannot read it"):
        read_video(junk, width=32, height=32)
    with pytest.raises(VideoError, match="no such file"):
        read_video(tmp_path / "missing.mp4", width=32, height=32)


def test_synthetic_dataset_round_trips_through_mp4(tmp_path):
    paths = write_synthetic_dataset(tmp_path / "shapes", 2, frames=17, width=64, height=48, seed=3)
    for path in paths:
        caption = path.with_suffix(".txt").read_text().strip()
        words = caption.split()  # "a COLOUR SHAPE moves from DIRECTION on a BACKGROUND background"
        clip = ShapeClip(shape=words[2], colour=words[1], direction=" ".join(words[5:8]),
                         background=" ".join(words[10:-1]))  # fmt: skip
        assert clip.caption == caption
        decoded, fps = read_video(path, width=64, height=48)
        expected = shape_clip_frames(clip, frames=17, width=64, height=48)
        assert fps == 16.0 and decoded.shape == expected.shape
        # H.264 at near-lossless quality: small error, far below a misplaced shape (~1/9 of the pixels off by >100)
        assert np.abs(decoded.astype(int) - expected).mean() < 3.0
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert write_synthetic_dataset(tmp_path / "shapes", 2, frames=17, width=64, height=48, seed=3) == paths  # reused
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    with pytest.raises(ValueError, match="already holds other videos"):
        write_synthetic_dataset(tmp_path / "shapes", 2, frames=17, width=64, height=48, seed=4)


def test_a_rotated_phone_video_decodes_as_displayed(tmp_path):
    import subprocess

    import imageio_ffmpeg

    video = np.zeros((8, 32, 64, 3), np.uint8)  # 64 wide x 32 tall, red strip along the left edge
    video[:, :, :16, 0] = 255
    write_mp4(tmp_path / "landscape.mp4", video, 16)
    rotated = tmp_path / "portrait.mp4"  # the same stream, flagged "display rotated 90 degrees" as phones do
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-display_rotation", "90",
                    "-i", str(tmp_path / "landscape.mp4"), "-c", "copy", str(rotated)], check=True)  # fmt: skip
    frames, _ = read_video(rotated, width=32, height=64)
    red = frames[0, ..., 0].astype(int)
    assert frames.shape == (8, 64, 32, 3)  # upright: taller than wide
    assert red[-16:].min() >= 240 and red[:-17].max() <= 15  # counter-clockwise: the left edge is now the bottom
