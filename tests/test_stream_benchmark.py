"""The streaming benchmark's parts: the synthetic-stream writer (a real mp4 read back with decord) and the scorer
(nearest-in-time assignment, CIDEr / retrieval on a hand-made stream, matched-quality interpolation, boundary
delays). The model and the end-to-end run are left to ``python benchmarks/streaming.py``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import stream_video
from benchmarks.stream_video import Segment, crop_path, read_segments, read_sidecar, write_stream
from benchmarks.streaming import (Decoded, StreamTruth, assign_decodes, boundary_delays, image_at, matched_quality,
                                  rate_at_quality, score_decodes, second_times)
from eval.caption_metrics import cider_per_item

FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k" / "images"


@pytest.fixture(scope="module")
def images() -> list[Path]:
    paths = sorted(FLICKR_IMAGES.glob("*.jpg"))[:3]
    if len(paths) < 3:
        pytest.skip(f"real test data missing: expected Flickr8k-1k images in {FLICKR_IMAGES}")
    return paths


def _decode_all(video: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(frames (N, H, W, 3) float, timestamps (N, 2), average fps) read back with decord."""
    import decord

    reader = decord.VideoReader(str(video), ctx=decord.cpu(0))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float64)
    return frames, reader.get_frame_timestamp(range(len(reader))), reader.get_avg_fps()


# ------------------------------------------------------------------------------------------------- write_stream

def _check_written(video: Path, segments: list[Segment], fps: int, size: int, min_s: float, max_s: float):
    frames, stamps, avg_fps = _decode_all(video)
    expected_frames = round(segments[-1].end * fps)
    assert len(frames) == expected_frames == read_sidecar(video)["frames"]
    assert frames.shape[1:] == (size, size, 3)
    assert avg_fps == pytest.approx(fps)
    assert abs(stamps[-1, 1] - segments[-1].end) <= 1 / fps + 1e-6  # decoded duration within one frame
    # segments tile [0, duration) in order, one per image, each between min_s and max_s (to half a frame)
    assert segments[0].start == 0
    assert all(a.end == pytest.approx(b.start) for a, b in zip(segments, segments[1:]))
    assert [s.image_index for s in segments] == list(range(len(segments)))
    assert all(min_s - 0.5 / fps <= s.end - s.start <= max_s + 0.5 / fps for s in segments)
    assert read_segments(video) == segments
    # the image changes exactly at the segment boundaries: the largest frame-to-frame jumps are there
    jumps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    boundaries = sorted(round(s.start * fps) - 1 for s in segments[1:])
    assert sorted(np.argsort(jumps)[-len(boundaries):].tolist()) == boundaries
    inside = np.delete(jumps, boundaries)
    assert inside.max() < jumps[boundaries].min()
    assert inside.mean() > 0.05  # the camera moves: frames within a segment are not all identical
    return frames


def test_write_stream_decodes_with_expected_frames_and_segments(images, tmp_path):
    video = tmp_path / "s.mp4"
    segments = write_stream(images, video, fps=10, size=64, seed=3, min_s=1.0, max_s=2.5)
    assert read_sidecar(video)["codec"] in ("libx264", "mpeg4")
    first = _check_written(video, segments, 10, 64, 1.0, 2.5)

    again = write_stream(images, tmp_path / "again.mp4", fps=10, size=64, seed=3, min_s=1.0, max_s=2.5)
    assert again == segments
    again_frames = _decode_all(tmp_path / "again.mp4")[0]  # deterministic for the seed, to libx264's bitstream
    assert again_frames.shape == first.shape and np.abs(again_frames - first).mean() < 4  # (see test_motion)
    other = write_stream(images, tmp_path / "other.mp4", fps=10, size=64, seed=4, min_s=1.0, max_s=2.5)
    assert other != segments


def test_write_stream_falls_back_to_mpeg4(images, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_video, "CODECS", (("no-such-encoder", {}),) + stream_video.CODECS[1:])
    video = tmp_path / "m.mp4"
    segments = write_stream(images[:2], video, fps=8, size=32, seed=0, min_s=1.0, max_s=2.0)
    assert read_sidecar(video)["codec"] == "mpeg4"
    _check_written(video, segments, 8, 32, 1.0, 2.0)


def test_write_stream_rejects_bad_arguments(images, tmp_path):
    with pytest.raises(ValueError, match="size=33"):
        write_stream(images, tmp_path / "x.mp4", size=33)
    with pytest.raises(ValueError, match="min_s=3"):
        write_stream(images, tmp_path / "x.mp4", min_s=3, max_s=2)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        write_stream([tmp_path / "missing.jpg"], tmp_path / "x.mp4")


def test_crop_path_is_a_smooth_square_window_inside_the_image():
    boxes = crop_path(200, 120, 40, np.random.default_rng(0))
    assert boxes.shape == (40, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 120).all()
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # square
    side = boxes[:, 2] - boxes[:, 0]
    assert (side >= stream_video.MIN_CROP * 120 - 1e-9).all() and (side <= stream_video.MAX_CROP * 120 + 1e-9).all()
    step = np.diff(boxes, axis=0)
    assert np.abs(step[[0, -1]]).max() < np.abs(step).max() / 5  # eased: starts and stops slowly
    assert np.abs(np.diff(step, axis=0)).max() < 1.0  # no jerk: acceleration stays below a pixel per frame^2


# ------------------------------------------------------------------------------------------------- the scorer

def test_second_times_and_image_at():
    np.testing.assert_allclose(second_times(4.7), [0.5, 1.5, 2.5, 3.5])
    segments = [Segment(0.0, 2.2, 7), Segment(2.2, 2.5, 3), Segment(2.5, 4.7, 9)]
    assert image_at(segments, np.array([0.0, 2.19, 2.2, 2.5, 4.6])).tolist() == [7, 7, 3, 9, 9]
    with pytest.raises(ValueError, match="outside the segments"):
        image_at(segments, np.array([4.7]))


def test_assign_decodes_nearest_ties_to_earlier_and_causal():
    decode_times = np.array([0.0, 3.0, 4.0])
    queries = np.array([0.5, 1.5, 1.6, 2.9, 3.5, 9.0])
    assert assign_decodes(decode_times, queries, "nearest").tolist() == [0, 0, 1, 1, 1, 2]
    assert assign_decodes(decode_times, queries, "causal").tolist() == [0, 0, 0, 0, 1, 2]
    assert assign_decodes(np.array([2.0]), np.array([0.5]), "causal").tolist() == [0]  # none before: the first
    with pytest.raises(ValueError, match="not sorted"):
        assign_decodes(np.array([1.0, 0.0]), queries)
    with pytest.raises(ValueError, match="unknown"):
        assign_decodes(decode_times, queries, "future")


DOG, CAR = "dog runs across green grass", "red car parked near building"


def _hand_stream():
    """Image 0 (all captions DOG) on [0, 2.2), image 1 (all CAR) on [2.2, 4.0); decodes DOG at 0.0, CAR at 2.8.
    Seconds 0.5, 1.5, 2.5, 3.5 show images 0, 0, 1, 1; the nearest decodes are DOG, CAR (1.3 < 1.5), CAR, CAR."""
    truth = StreamTruth("hand", Path("hand.mp4"), 4.0, [Segment(0.0, 2.2, 0), Segment(2.2, 4.0, 1)])
    decoded = Decoded(np.array([0.0, 2.8]), [DOG, CAR], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    captions = [[DOG] * 5, [CAR] * 5]
    caption_emb = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    caption_image = torch.tensor([0] * 5 + [1] * 5)
    return truth, decoded, captions, caption_emb, caption_image


def test_score_decodes_on_a_hand_made_stream():
    truth, decoded, captions, caption_emb, caption_image = _hand_stream()
    # The reference corpus is the four seconds: each n-gram is in 2 of 4 documents (idf log 2 > 0), the two
    # captions share no word, so a right text scores exactly 10 and a wrong one 0.
    assert cider_per_item([[DOG] * 5, [DOG] * 5, [CAR] * 5, [CAR] * 5], [DOG, CAR, CAR, CAR]) == pytest.approx(
        [10.0, 0.0, 10.0, 10.0])
    nearest = score_decodes([truth], [decoded], captions, caption_emb, caption_image, "nearest")
    assert nearest["decodes"] == 2 and nearest["rate"] == pytest.approx(0.5)
    assert nearest["cider"] == pytest.approx(7.5)  # 3 of 4 seconds right
    assert nearest["retrieval"] == pytest.approx(0.75)
    # causal: 0.5 -> DOG, 1.5 -> DOG, 2.5 -> DOG (CAR comes at 2.8), 3.5 -> CAR: also 3 of 4, a different 3
    causal = score_decodes([truth], [decoded], captions, caption_emb, caption_image, "causal")
    assert causal["cider"] == pytest.approx(7.5) and causal["retrieval"] == pytest.approx(0.75)
    early = Decoded(np.array([1.0, 2.6]), [DOG, CAR], decoded.embeddings)
    perfect = score_decodes([truth], [early], captions, caption_emb, caption_image, "nearest")
    assert perfect["cider"] == pytest.approx(10.0) and perfect["retrieval"] == 1.0
    # retrieval reads the embedding, CIDEr the text: swapping the embeddings leaves CIDEr and flips retrieval
    swapped = Decoded(early.times, early.texts, early.embeddings.flip(0))
    flipped = score_decodes([truth], [swapped], captions, caption_emb, caption_image, "nearest")
    assert flipped["cider"] == pytest.approx(10.0) and flipped["retrieval"] == 0.0


def test_rate_at_quality_interpolates_the_first_crossing():
    rates, quality = [1.0, 0.3, 0.1, 0.5], [5.0, 3.0, 1.0, 2.0]  # unsorted on purpose
    assert rate_at_quality(rates, quality, 2.0) == pytest.approx(0.2)  # between (0.1, 1) and (0.3, 3)
    assert rate_at_quality(rates, quality, 3.0) == pytest.approx(0.3)
    assert rate_at_quality(rates, quality, 4.0) == pytest.approx(0.5 + 0.5 * 2 / 3)  # after the dip at 0.5
    assert rate_at_quality(rates, quality, 0.5) == pytest.approx(0.1)  # already reached at the lowest rate
    assert rate_at_quality(rates, quality, 6.0) is None


def test_matched_quality_factor():
    rows = [{"policy": "uniform", "value": 1.0, "rate": 1.0, "cider": 3.0},
            {"policy": "uniform", "value": 2.0, "rate": 0.5, "cider": 2.0},
            {"policy": "online-cosine", "value": 0.1, "rate": 0.1, "cider": 1.0},
            {"policy": "online-cosine", "value": 0.05, "rate": 0.3, "cider": 4.0},
            {"policy": "offline", "value": 0.2, "rate": 0.2, "cider": 2.5}]
    matched = matched_quality(rows, "cider")
    assert matched["reference"]["cider"] == 3.0
    assert matched["online-cosine"]["rate"] == pytest.approx(0.1 + 0.2 * 2 / 3)
    assert matched["online-cosine"]["factor"] == pytest.approx(1 / (0.1 + 0.2 * 2 / 3))
    assert matched["offline"] == {"rate": None, "factor": None}
    assert "uniform" not in matched
    rows[0]["cider"] = 0.0  # a zero reference quality is matched by anything: no factor is reported
    zero = matched_quality(rows, "cider")
    assert zero["online-cosine"] == zero["offline"] == {"rate": None, "factor": None}
    assert "note" in zero["reference"]


def test_boundary_delays():
    segments = [Segment(0.0, 3.0, 0), Segment(3.0, 5.0, 1), Segment(5.0, 9.0, 2), Segment(9.0, 10.0, 3)]
    # 3.0 -> 3.5 (0.5 s); 5.0 -> 6.0 (1.0 s); 9.0: no decode in [9, 10): missed
    result = boundary_delays(segments, [0.0, 6.0, 3.5, 7.0])
    assert result == {"boundaries": 3, "detected": 2, "mean_delay_s": pytest.approx(0.75), "missed": 1}
    assert boundary_delays(segments[:1], [0.0])["mean_delay_s"] is None


def test_curve_json_shape_of_a_summary_round_trips():
    truth, decoded, captions, caption_emb, caption_image = _hand_stream()
    row = score_decodes([truth], [decoded], captions, caption_emb, caption_image)
    assert json.loads(json.dumps(row)) == row  # plain JSON types only (what curve.json stores)
