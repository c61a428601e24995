"""Selective decoding on streams (eval/streaming.py, `jepa stream`): the online detectors fire at the true
boundaries of a piecewise-constant embedding stream and nowhere else, with closed-form timing; Ward segmentation
recovers the same boundaries; the detector's memory does not grow with the stream; VideoStream samples the real
bikes.mp4 by timestamp and ends a truncated copy cleanly; the CLI captions a video end to end (printed lines,
JSONL, SRT) and keeps the decodes of a truncated one."""
import functools
import json
import logging
import math
import re
import tracemalloc

import pytest
import torch
import torch.nn.functional as F

import eval.vl_embed
import train
from eval.streaming import (Decode, Frame, OnlineDetector, UniformDetector, VideoStream, embed_stream, frames_from,
                            offline_decodes, offline_segments, run_online, uniform_decodes)

from conftest import REPO, make_flickr_subset

VIDEOS = REPO.parent / "shared" / "data" / "videos"
BIKES = VIDEOS / "bikes.mp4"  # 640x272, 25 fps, 250 frames = 10 s
SEGMENT, SEGMENTS, DIM, STEP = 12, 5, 32, 0.5
BOUNDARIES = [SEGMENT * k for k in range(1, SEGMENTS)]


def piecewise_stream(seed: int, noise: float = 0.05) -> tuple[list[float], torch.Tensor]:
    """5 segments of 12 steps, each a random unit vector plus N(0, noise^2) per component, renormalised; 0.5 s a
    step -> (times (60,), embeddings (60, 32))."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(SEGMENTS, DIM, generator=g), dim=1)
    noisy = centers.repeat_interleave(SEGMENT, 0) + noise * torch.randn(SEGMENTS * SEGMENT, DIM, generator=g)
    return [STEP * i for i in range(SEGMENTS * SEGMENT)], F.normalize(noisy, dim=1)


def unit(*coords) -> torch.Tensor:
    vector = torch.zeros(8)
    vector[:len(coords)] = torch.tensor(coords, dtype=torch.float32)
    return F.normalize(vector, dim=0)


@pytest.mark.parametrize("statistic,smooth", [("cosine", 1), ("cosine", 3), ("cusum", 1), ("cusum", 3)])
def test_online_detector_fires_at_every_boundary_and_nowhere_else(statistic, smooth):
    for seed in range(10):
        times, embeddings = piecewise_stream(seed)
        detector = OnlineDetector(0.3, min_interval=1.0, smooth=smooth, statistic=statistic)
        decodes = run_online(zip(times, embeddings), detector)
        assert [d.reason for d in decodes] == ["first"] + ["change"] * len(BOUNDARIES), (seed, decodes)
        fired = [d.index for d in decodes[1:]]
        assert all(0 <= at - boundary <= 2 for at, boundary in zip(fired, BOUNDARIES)), (seed, fired)
        assert [d.t for d in decodes] == [times[d.index] for d in decodes]
        assert detector.steps == len(times) and detector.decision_seconds > 0


def test_ward_segmentation_recovers_the_boundaries():
    for seed in range(10):
        times, embeddings = piecewise_stream(seed)
        segments = offline_segments(embeddings, n_segments=SEGMENTS)
        assert segments == [(start, start + SEGMENT) for start in range(0, SEGMENTS * SEGMENT, SEGMENT)], seed
    decodes = offline_decodes(times, embeddings, n_segments=SEGMENTS)
    assert [d.index for d in decodes] == [0, *BOUNDARIES] and {d.reason for d in decodes} == {"segment"}
    assert [d.t for d in decodes] == [times[i] for i in (0, *BOUNDARIES)]
    torch.testing.assert_close(decodes[1].embedding, F.normalize(embeddings[12:24].mean(0), dim=0))
    # a distance threshold between the within-segment and the between-segment merge costs finds the same runs
    assert offline_segments(embeddings, distance_threshold=2.0) == segments
    assert offline_segments(embeddings, distance_threshold=0.0) == [(i, i + 1) for i in range(len(times))]
    assert offline_segments(embeddings[:1], n_segments=3) == [(0, 1)]
    with pytest.raises(ValueError, match="exactly one of n_segments"):
        offline_segments(embeddings, n_segments=2, distance_threshold=1.0)


def test_cosine_with_smoothing_has_its_closed_form_lag():
    """Orthogonal a -> b with a 3-step moving average: after one b step d = 1 - 2/sqrt(5) = 0.106, after two
    d = 1 - 1/sqrt(5) = 0.553; threshold 0.3 fires at the second, decoding b (smoothing restarts at a decode)."""
    a, b = unit(1), unit(0, 1)
    steps = [(0.5 * i, a) for i in range(6)] + [(3.0 + 0.5 * i, b) for i in range(6)]
    decodes = run_online(steps, OnlineDetector(0.3, min_interval=0.0, smooth=3))
    assert [(d.index, d.reason) for d in decodes] == [(0, "first"), (7, "change")]
    torch.testing.assert_close(decodes[1].embedding, b)
    assert run_online(steps, OnlineDetector(1 - 2 / math.sqrt(5) - 1e-3, min_interval=0.0, smooth=3))[1].index == 6


def test_cusum_accumulates_the_excess_distance():
    """d = 1 - cos = 0.2 a step, drift 0.05: S = 0.15, 0.30, 0.45 after the change at step 5 -> the first S above
    the threshold decides: 0.4 and 0.31 fire at step 7, 0.29 at step 6; plain cosine at 0.4 never (d < 0.4)."""
    a, c = unit(1), unit(0.8, 0.6)  # cos(a, c) = 0.8
    steps = [(float(i), a) for i in range(5)] + [(5.0 + i, c) for i in range(5)]
    decodes = run_online(steps, OnlineDetector(0.4, min_interval=0.0, statistic="cusum", drift=0.05))
    assert [(d.index, d.reason) for d in decodes] == [(0, "first"), (7, "change")]
    decodes = run_online(steps, OnlineDetector(0.31, min_interval=0.0, statistic="cusum", drift=0.05))
    assert [d.index for d in decodes] == [0, 7]
    decodes = run_online(steps, OnlineDetector(0.29, min_interval=0.0, statistic="cusum", drift=0.05))
    assert [d.index for d in decodes] == [0, 6]
    assert [d.index for d in run_online(steps, OnlineDetector(0.4, min_interval=0.0))] == [0]


def test_min_and_max_interval():
    a, b = unit(1), unit(0, 1)
    steps = [(0.5 * i, a if i < 2 else b) for i in range(20)]  # the change comes 1 s after the start
    held = run_online(steps, OnlineDetector(0.3, min_interval=3.0))
    assert [(d.t, d.reason) for d in held] == [(0.0, "first"), (3.0, "change")]
    forced = run_online([(0.5 * i, a) for i in range(20)], OnlineDetector(0.3, min_interval=1.0, max_interval=2.0))
    assert [(d.t, d.reason) for d in forced] == [(0.0, "first")] + [(t, "max_interval") for t in (2.0, 4.0, 6.0, 8.0)]
    with pytest.raises(ValueError, match="max_interval 0.5 is below min_interval 1.0"):
        OnlineDetector(0.3, min_interval=1.0, max_interval=0.5)
    with pytest.raises(ValueError, match="statistic 'ewma' is unknown"):
        OnlineDetector(0.3, statistic="ewma")
    with pytest.raises(ValueError, match=r"step 1: embedding \(4,\) \(expected a tensor \(8,\)\)"):
        run_online([(0.0, a), (0.5, torch.ones(4))], OnlineDetector(0.3))


def test_uniform_decodes_on_a_fixed_grid():
    embeddings = F.normalize(torch.randn(20, 4), dim=1)
    times = [0.5 * i for i in range(20)]
    decodes = uniform_decodes(times, embeddings, every=1.2)  # grid 0, 1.2, 2.4, ... -> first step at or after each
    assert [d.t for d in decodes] == [0.0, 1.5, 2.5, 4.0, 5.0, 6.0, 7.5, 8.5]
    assert [d.reason for d in decodes] == ["first"] + ["uniform"] * 7
    torch.testing.assert_close(decodes[1].embedding, embeddings[3])
    gap = uniform_decodes([0.0, 0.5, 5.0, 5.5, 6.0], embeddings[:5], every=1.0)  # a gap covers many grid points
    assert [d.t for d in gap] == [0.0, 5.0, 6.0]
    detector = UniformDetector(2.0)
    assert [d.index for d in run_online(zip(times, embeddings), detector)] == [0, 4, 8, 12, 16]
    assert detector.steps == 20
    with pytest.raises(ValueError, match="'every' must be a number > 0"):
        UniformDetector(0)


def test_embed_stream_windows_and_batches():
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(7)]
    basis = torch.eye(7)
    calls = []

    def embed_fn(frames):  # frame i -> e_i
        calls.append(len(frames))
        return basis[frames[:, 0, 0, 0].long()]

    one = list(embed_stream(frames_from([(0.5 * i, im) for i, im in enumerate(images)]), embed_fn, batch=3, window=1))
    assert calls == [3, 3, 1] and [t for t, _ in one] == [0.5 * i for i in range(7)]
    torch.testing.assert_close(torch.stack([e for _, e in one]), basis)
    windowed = list(embed_stream([Frame(0.5 * i, im) for i, im in enumerate(images)], embed_fn, window=3))
    torch.testing.assert_close(windowed[1][1], F.normalize(basis[0] + basis[1], dim=0))
    torch.testing.assert_close(windowed[5][1], F.normalize(basis[3] + basis[4] + basis[5], dim=0))
    with pytest.raises(ValueError, match=r"frame 0 \(t=0.0\) has image \(4, 4\)"):
        list(embed_stream([(0.0, torch.zeros(4, 4, dtype=torch.uint8))], embed_fn))


def _stationary_run(steps: int, statistic: str) -> tuple[int, list[Decode], OnlineDetector]:
    """The tracemalloc peak (bytes) of ``steps`` online steps of one noisy scene (embeddings made on the fly)."""
    g = torch.Generator().manual_seed(0)
    center = F.normalize(torch.randn(DIM, generator=g), dim=0)
    pool = F.normalize(center + 0.05 * torch.randn(64, DIM, generator=g), dim=1)
    detector = OnlineDetector(0.3, min_interval=1.0, smooth=3, statistic=statistic)
    tracemalloc.start()
    try:
        decodes = run_online(((0.5 * i, pool[i % 64]) for i in range(steps)), detector)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, decodes, detector


@pytest.mark.parametrize("statistic", ["cosine", "cusum"])
def test_online_memory_does_not_grow_with_the_stream(statistic):
    short_peak, short, short_detector = _stationary_run(2_000, statistic)
    long_peak, long, long_detector = _stationary_run(20_000, statistic)
    assert len(short) == len(long) == 1  # one scene: only the first decode
    assert long_detector.steps == 20_000 and long_detector.state_nbytes == short_detector.state_nbytes
    assert long_detector.state_nbytes == (3 + 1) * DIM * 4  # the ring (3, D) and the anchor (D,), fp32
    assert long_peak < short_peak + 4096, (short_peak, long_peak)  # a history of 18,000 more steps would be >100 kB


# ------------------------------------------------------------------------------------------------------- video

def _require(path):
    if not path.exists():
        raise FileNotFoundError(f"real test data missing: expected {path} (see ../shared/data)")


def test_video_stream_samples_by_timestamp():
    _require(BIKES)
    frames = list(VideoStream(BIKES, fps=2))
    assert [f.t for f in frames] == [0.5 * k for k in range(20)]
    assert all(f.image.shape == (3, 272, 640) and f.image.dtype == torch.uint8 for f in frames)
    stream = VideoStream(BIKES, fps=3)
    frames = list(stream)
    assert stream.error is None and stream.duration == pytest.approx(10.0) and len(frames) == 30
    import decord  # here, not at import: decord's bundled libraries break torchvision's PNG decoder in forked workers

    reference = decord.VideoReader(str(BIKES), num_threads=1)
    for frame in frames[::7]:  # the frame shown at t: index floor(t * 25) of a constant-rate video
        expected = torch.from_numpy(reference[math.floor(frame.t * 25 + 1e-6)].asnumpy()).permute(2, 0, 1)
        assert torch.equal(frame.image, expected), frame.t
    assert isinstance(frames_from(str(BIKES), fps=1), VideoStream) and len(list(frames_from(BIKES, 1))) == 10


def faststart_copy(src, dst):
    """Remux ``src`` with its index (moov) before the data, as a web download would be; frames are unchanged."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        video = source.streams.video[0]
        add = getattr(out, "add_stream_from_template", None)  # PyAV >= 13; older: add_stream(template=...)
        stream = add(video) if add else out.add_stream(template=video)
        for packet in source.demux(video):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def truncated(src, dst, fraction=0.4):
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def test_truncated_video_ends_the_stream_cleanly(tmp_path, caplog):
    _require(BIKES)
    caplog.set_level(logging.WARNING, logger="eval.streaming")
    cut = truncated(BIKES, tmp_path / "cut.mp4")  # bikes.mp4 keeps its index at the end: nothing is decodable
    stream = VideoStream(cut, fps=2)
    assert list(stream) == [] and "cut.mp4" in stream.error and "t=0.00 s" in stream.error
    assert any("cut.mp4" in r.getMessage() for r in caplog.records)

    full = list(VideoStream(BIKES, fps=2))
    cut = truncated(faststart_copy(BIKES, tmp_path / "fast.mp4"), tmp_path / "fast_cut.mp4")
    stream = VideoStream(cut, fps=2)
    frames = list(stream)
    assert 4 <= len(frames) < 20 and [f.t for f in frames] == [0.5 * k for k in range(len(frames))]
    assert all(torch.equal(f.image, g.image) for f, g in zip(frames, full))
    assert stream.error is not None and "fast_cut.mp4" in stream.error
    assert f"ended early at t={0.5 * len(frames):.2f} s" in stream.error  # the first time not yielded
    assert any("fast_cut.mp4" in r.getMessage() and "ended early" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoStream(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """A 1-step VL-JEPA checkpoint trained on 24 real Flickr images (16 train: the 80-caption decode bank)."""
    root, split = make_flickr_subset(tmp_path_factory.mktemp("flickr"))
    out = tmp_path_factory.mktemp("vl_ckpt")
    train.main(["--config", str(REPO / "configs" / "vljepa" / "tiny_cpu.yaml"), "trainer.max_steps=1",
                "trainer.checkpoint_every=1", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
                "predictor.dim=64", "predictor.num_heads=2", "predictor.depth=1", "trainer.progress_bar=false",
                f"trainer.output_dir={out}", f"data.token_cache_dir={out}/c", f"data.root={root}",
                f"data.split_file={split}"])
    return out, root


LINE = re.compile(r"^\[ *(\d+\.\d) s\] (first|change|max_interval|segment|uniform) +(\S.*)$")
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")


def srt_cues(text):
    """[(start s, end s, text)] of an SRT file, checking the numbering and the layout."""
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), 1):
        index, times, caption = block.split("\n")
        assert index == str(number)
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, SRT_TIME.match(times).groups())
        cues.append((3600 * h1 + 60 * m1 + s1 + ms1 / 1000, 3600 * h2 + 60 * m2 + s2 + ms2 / 1000, caption))
    return cues


_load_vl_once = functools.cache(eval.vl_embed.load_vl)


def run_cli(capsys, *argv):
    """``jepa stream ARGV`` in process (the model read once per test session) -> (parsed decode lines, stdout)."""
    from jepa.cli import main as jepa_main

    capsys.readouterr()
    jepa_main(["stream", *argv])
    out = capsys.readouterr().out
    return [LINE.match(line).groups() for line in out.splitlines() if line.startswith("[")], out


@pytest.fixture
def model_read_once(monkeypatch):
    monkeypatch.setattr(eval.vl_embed, "load_vl", _load_vl_once)


@pytest.mark.slow
def test_stream_cli_end_to_end(tiny_vl, tmp_path, capsys, model_read_once):
    _require(BIKES)
    ckpt, bank_root = tiny_vl
    captions = {line.split(",", 1)[1] for line in (bank_root / "captions.txt").read_text().splitlines()[1:]}
    jsonl, srt = tmp_path / "out.jsonl", tmp_path / "out.srt"
    lines, out = run_cli(capsys, "--video", str(BIKES), "--ckpt", str(ckpt), "--fps", "1", "--bank", str(bank_root),
                         "--max-interval", "4", "--jsonl", str(jsonl), "--srt", str(srt))
    assert lines and lines[0][:2] == ("0.0", "first")
    times = [float(t) for t, _, _ in lines]
    assert all(1.0 <= b - a <= 4.0 for a, b in zip(times, times[1:]))  # min_interval 1 s, max_interval 4 s
    assert all(text in captions for _, _, text in lines)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(f"{r['t']:.1f}", r["reason"], r["text"]) for r in records] == lines
    cues = srt_cues(srt.read_text())
    assert [c[0] for c in cues] == times and [c[2] for c in cues] == [text for _, _, text in lines]
    assert [c[1] for c in cues] == times[1:] + [10.0]  # shown until the next decode; the last until the stream end
    assert re.search(rf"summary: {len(lines)} decodes over 10\.0 s of stream \(\d+\.\d\d per second\), "
                     r"decision latency \d+\.\d{3} ms per step", out)

    lines, out = run_cli(capsys, "--video", str(BIKES), "--ckpt", str(ckpt), "--fps", "0.5", "--bank",
                         str(bank_root), "--mode", "offline", "--segments", "2")
    assert len(lines) == 2 and lines[0][0] == "0.0" and {reason for _, reason, _ in lines} == {"segment"}
    assert "summary: 2 decodes over 10.0 s of stream (0.20 per second)" in out


@pytest.mark.slow
def test_stream_cli_keeps_the_decodes_of_a_truncated_video(tiny_vl, tmp_path, capsys, model_read_once):
    _require(BIKES)
    ckpt, bank_root = tiny_vl
    cut = truncated(faststart_copy(BIKES, tmp_path / "fast.mp4"), tmp_path / "cut.mp4")
    jsonl, srt = tmp_path / "cut.jsonl", tmp_path / "cut.srt"
    with pytest.raises(SystemExit, match=r"cut\.mp4' ended early at t=\d\.\d\d s.*kept the \d+ decodes so far"):
        run_cli(capsys, "--video", str(cut), "--ckpt", str(ckpt), "--fps", "1", "--bank", str(bank_root),
                "--mode", "uniform", "--every", "1", "--jsonl", str(jsonl), "--srt", str(srt))
    printed = [LINE.match(line).groups() for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert 3 <= len(records) < 10 and len(records) == len(printed) == len(srt_cues(srt.read_text()))
    assert [(r["t"], r["reason"]) for r in records] == [(0.0, "first")] + [(float(k), "uniform")
                                                                           for k in range(1, len(records))]
    assert [(f"{r['t']:.1f}", r["reason"], r["text"]) for r in records] == printed
