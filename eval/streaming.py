"""Selective decoding on a video stream: embed frames with a VL-JEPA model, decode text only when the meaning changes.

    stream = VideoStream("clip.mp4", fps=2)                  # Frame(t, image (3, H, W) uint8) by video time
    steps = embed_stream(stream, frame_embedder(...), window=1)   # (t, embedding (D,)) one per frame
    decodes = run_online(steps, OnlineDetector(threshold=0.1), decode_fn=bank.decode, on_decode=print)
    stream.error                                              # None, or why the video ended early

Three ways of choosing when to decode:
- online (``OnlineDetector``): one embedding at a time, O(1) state. ``cosine``: decode when the cosine distance of the
  (moving-average) embedding to the embedding of the last decode exceeds ``threshold``; ``cusum``: a CUSUM of the
  per-step distance to the running mean of the current segment, ``S = max(0, S + d - drift)``, decode when
  ``S > threshold``. ``min_interval`` holds a decode back, ``max_interval`` forces one; the first step decodes.
- offline (``offline_segments`` / ``offline_decodes``): Ward clustering constrained to the time chain, so every
  cluster is a contiguous run of steps; one decode per segment, of its mean embedding.
- uniform (``UniformDetector`` / ``uniform_decodes``): a decode every ``every`` seconds, the baseline.

Decoding (``decode_fn``) is any ``emb (1, D) -> [text]``, e.g. ``eval.decode.CaptionBank(...).decode``.
"""
from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

STATISTICS = ("cosine", "cusum")
REASONS = ("first", "change", "max_interval", "segment", "uniform")
_TIME_EPS = 1e-6  # timestamps are compared with this slack (float seconds from the container's time base)
_READ_CHUNK = 8  # frames decoded per decord get_batch call
_NORM_EPS = 1e-12  # as F.normalize's eps


@dataclass
class Frame:
    t: float  # seconds of video time
    image: torch.Tensor  # (3, H, W) uint8


@dataclass
class Decode:
    t: float  # seconds of video time of the step that decoded
    index: int  # step index (0-based) in the embedding stream
    embedding: torch.Tensor  # (D,) L2-normalised: what was (or is to be) decoded
    text: str | None
    reason: str  # one of REASONS


# ----------------------------------------------------------------------------------------------------------- frames

class VideoStream:
    """Frames of a video file at ``fps`` frames per second of video time: ``Frame(t, image (3, H, W) uint8)`` for
    ``t = 0, 1/fps, 2/fps, ...`` below the video's duration, each the frame shown at ``t`` (the last frame whose
    timestamp is <= t). Read with decord (``num_threads`` decoding threads), a few frames at a time, so memory does
    not grow with the video's length. A file decord cannot open (an mp4 truncated after its index, which decord
    reads whole at open) is read with PyAV, which decodes up to where the data ends.

    A truncated or corrupt video ends the iteration cleanly: the frames before the damage are yielded, ``error``
    says why and where (``None`` after a complete read), and a warning names the file and the time.
    """

    def __init__(self, path, fps: float = 2.0, num_threads: int = 1):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video '{self.path}' does not exist (expected a video file: mp4, avi, mkv, ...)")
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a number > 0 (frames per second of video time), got {fps!r}")
        if int(num_threads) != num_threads or num_threads < 1:
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        self.fps, self.num_threads = float(fps), int(num_threads)
        self.error: str | None = None
        self.duration: float | None = None  # seconds, known once iteration has started

    def __iter__(self) -> Iterator[Frame]:
        self.error = None
        try:
            reader = self._open_decord()
        except Exception as decord_err:  # decord raises DECORDError / RuntimeError for unreadable files
            yield from self._iter_pyav(str(decord_err).strip().splitlines()[0][:300])
            return
        yield from self._iter_decord(reader)

    def _targets(self, duration: float) -> Iterator[float]:
        k = 0
        while (t := k / self.fps) < duration - _TIME_EPS:
            yield t
            k += 1

    def _fail(self, t: float, why: str) -> None:
        self.error = f"video '{self.path}' ended early at t={t:.2f} s: {why}"
        logger.warning("%s", self.error)

    def _open_decord(self):
        import decord

        return decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=self.num_threads)

    def _iter_decord(self, reader) -> Iterator[Frame]:
        import decord

        count = len(reader)
        if count == 0:
            self.duration = 0.0
            self._fail(0.0, "no frames")
            return
        stamps = torch.as_tensor(reader.get_frame_timestamp(range(count)), dtype=torch.float64)  # (N, 2) start, end
        starts = stamps[:, 0].contiguous()
        self.duration = float(stamps[-1, 1])
        targets = list(self._targets(self.duration))
        indices = (torch.searchsorted(starts, torch.tensor(targets, dtype=torch.float64) + _TIME_EPS,
                                      right=True) - 1).clamp(min=0).tolist()
        for begin in range(0, len(targets), _READ_CHUNK):
            chunk_t, chunk_i = targets[begin:begin + _READ_CHUNK], indices[begin:begin + _READ_CHUNK]
            try:
                with decord.bridge.use_torch():
                    frames = reader.get_batch(chunk_i)  # (n, H, W, 3) uint8
            except Exception:  # the chunk holds a bad frame: read one by one up to it
                for t, index in zip(chunk_t, chunk_i):
                    try:
                        with decord.bridge.use_torch():
                            frame = reader.get_batch([index])[0]
                    except Exception as err:  # decord's DECORDError and friends
                        self._fail(t, f"frame {index} could not be decoded ({str(err).strip()[:200]})")
                        return
                    yield Frame(t, frame.permute(2, 0, 1).contiguous())
                continue
            for t, frame in zip(chunk_t, frames):
                yield Frame(t, frame.permute(2, 0, 1).contiguous())

    def _iter_pyav(self, decord_error: str) -> Iterator[Frame]:
        try:
            import av

            container = av.open(str(self.path))
            stream = container.streams.video[0]
        except Exception as err:  # av.error.* (InvalidDataError, ...), IndexError: no video stream
            self.duration = 0.0
            self._fail(0.0, f"unreadable ({decord_error}; PyAV: {str(err).strip()[:200]})")
            return
        try:
            yield from self._decode_pyav(container, stream)
        finally:
            container.close()

    def _decode_pyav(self, container, stream) -> Iterator[Frame]:
        stream.thread_count = self.num_threads
        rate = float(stream.average_rate or 25)
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        targets = self._targets(math.inf)
        target = next(targets)
        shown, shown_t, why = None, -math.inf, None  # the frame on screen (an av.VideoFrame) and its start time
        image = None  # ``shown`` as (3, H, W) uint8, converted only when a target time falls on it

        def current() -> torch.Tensor:
            nonlocal image
            if image is None:
                image = torch.from_numpy(shown.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
            return image

        try:
            for decoded in container.decode(stream):
                start = float(decoded.time) if decoded.time is not None else shown_t + 1 / rate
                while shown is not None and target < start - _TIME_EPS:
                    yield Frame(target, current())
                    target = next(targets)
                shown, shown_t, image = decoded, start, None
        except Exception as err:  # av.error.* while demuxing / decoding damaged data
            why = f"decoding failed ({str(err).strip()[:200]})"
        end = shown_t + 1 / rate if shown is not None else 0.0
        if why is None and declared is not None and end < declared - 1 / rate:
            why = f"the data stops at {end:.2f} s of its declared {declared:.2f} s (truncated file)"
        self.duration = declared if why is None and declared is not None else end
        while shown is not None and target < min(end, self.duration) - _TIME_EPS:
            yield Frame(target, current())
            target = next(targets)
        if why is not None:
            self._fail(target if shown is not None else 0.0, why)


def frames_from(source, fps: float = 2.0) -> Iterable[Frame]:
    """A path (str / Path) -> ``VideoStream(path, fps)``; any iterable of ``Frame`` or ``(t, image (3, H, W) uint8)``
    passes through as ``Frame`` objects (``fps`` is then not used: the frames are already sampled)."""
    if isinstance(source, (str, Path)):
        return VideoStream(source, fps)
    return _as_frames(source)


def _as_frames(items) -> Iterator[Frame]:
    for index, item in enumerate(items):
        frame = item if isinstance(item, Frame) else Frame(*item)
        if not (isinstance(frame.image, torch.Tensor) and frame.image.ndim == 3 and frame.image.shape[0] == 3
                and frame.image.dtype == torch.uint8):
            shape = tuple(frame.image.shape) if isinstance(frame.image, torch.Tensor) else type(frame.image).__name__
            raise ValueError(f"frame {index} (t={frame.t}) has image {shape} (expected a (3, H, W) uint8 tensor)")
        yield frame


def embed_stream(frames: Iterable[Frame], embed_fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 1,
                 window: int = 1) -> Iterator[tuple[float, torch.Tensor]]:
    """Frames -> ``(t, embedding (D,))`` per frame, in order. ``embed_fn(frames (B, 3, H, W) uint8) -> (B, D)`` is
    called on ``batch`` frames at a time (a larger batch is faster and adds ``batch - 1`` frames of latency).
    ``window > 1``: each embedding is the L2-normalised mean of the last ``window`` frame embeddings (fewer at the
    start), kept in a fixed ring buffer."""
    for name, value in (("batch", batch), ("window", window)):
        if int(value) != value or value < 1:
            raise ValueError(f"embed_stream {name} must be an integer >= 1, got {value!r}")
    ring = _Ring(window)
    pending: list[Frame] = []

    def flush() -> Iterator[tuple[float, torch.Tensor]]:
        emb = embed_fn(torch.stack([f.image for f in pending]))
        if emb.ndim != 2 or emb.shape[0] != len(pending):
            raise ValueError(f"embed_fn returned shape {tuple(emb.shape)} for {len(pending)} frames "
                             f"(expected ({len(pending)}, D))")
        for frame, row in zip(pending, emb):
            yield frame.t, (F.normalize(ring.push(row.float()), dim=0) if window > 1 else row)
        pending.clear()

    for frame in _as_frames(frames):
        pending.append(frame)
        if len(pending) == batch:
            yield from flush()
    if pending:
        yield from flush()


class _Ring:
    """The sum of the last ``size`` pushed vectors (D,), kept in a preallocated (size, D) buffer: O(1) memory. The
    sum is recomputed from the buffer (``size`` rows), so no rounding error builds up over a long stream."""

    def __init__(self, size: int):
        self.size, self.buffer, self.count, self.at = size, None, 0, 0

    def push(self, vector: torch.Tensor) -> torch.Tensor:
        """vector (D,) -> the sum (D,) of the last ``size`` vectors (fewer until ``size`` were pushed)."""
        if self.size == 1:
            return vector
        if self.buffer is None:
            self.buffer = torch.zeros(self.size, vector.shape[-1], device=vector.device)
        self.buffer[self.at].copy_(vector)
        self.at = (self.at + 1) % self.size
        self.count = min(self.count + 1, self.size)
        return self.buffer.sum(0) if self.count == self.size else self.buffer[:self.count].sum(0)

    def reset(self) -> None:
        self.count, self.at = 0, 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes


# ------------------------------------------------------------------------------------------------------- online

class _Timed(abc.ABC):
    """A detector's ``step`` around its ``_decide``, timed: decision wall time: ``decision_seconds`` (sum over steps) and ``steps``; ``mean_decision_ms``."""

    decision_seconds: float = 0.0
    steps: int = 0

    @property
    def mean_decision_ms(self) -> float:
        return 1000 * self.decision_seconds / self.steps if self.steps else 0.0

    def step(self, t: float, embedding: torch.Tensor) -> Decode | None:
        start = time.perf_counter()
        try:
            return self._decide(float(t), embedding)
        finally:
            self.decision_seconds += time.perf_counter() - start
            self.steps += 1

    @abc.abstractmethod
    def _decide(self, t: float, embedding: torch.Tensor) -> Decode | None:
        """The detector's decision for one step (Decode or None)."""


def _check_embedding(embedding: torch.Tensor, dim: int | None, index: int) -> torch.Tensor:
    """(D,) float32 without autograd history, or a ValueError naming the step and the shape."""
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 1 or (dim is not None and len(embedding) != dim):
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ValueError(f"step {index}: embedding {shape} (expected a tensor ({dim if dim else 'D'},))")
    if embedding.requires_grad:
        embedding = embedding.detach()
    return embedding if embedding.dtype == torch.float32 else embedding.float()


class OnlineDetector(_Timed):
    """Decide, one embedding at a time, when to decode. O(1) memory per step (no history kept).

    step(t, embedding (D,)) -> ``Decode`` (text None; the caller decodes) or None.
    - the first step decodes (``"first"``);
    - ``statistic="cosine"``: distance ``d = 1 - cos(smoothed, anchor)`` where ``smoothed`` is the mean of the last
      ``smooth`` embeddings and ``anchor`` the embedding of the last decode; ``d > threshold`` -> ``"change"``.
      With ``smooth = k``, an abrupt change between orthogonal embeddings gives d = 1 - (k - j) / sqrt((k - j)^2 +
      j^2) after j steps (k = 3: 0.106, 0.553, 1), so the smoothing trades up to k - 1 steps of lag for noise;
    - ``statistic="cusum"``: ``d = 1 - cos(smoothed, segment mean)``, the mean of the current segment's in-control
      steps (those that leave S at 0; reset to the decoded embedding at each decode); ``S = max(0, S + d - drift)``,
      ``S > threshold`` -> ``"change"``. A jump of ``Δ`` above ``drift`` fires after about ``threshold / Δ`` steps;
      a slow drift accumulates and fires too;
    - a change waits until ``t - t_last >= min_interval``; ``max_interval > 0`` forces a decode
      (``"max_interval"``) once ``t - t_last >= max_interval``.
    The moving average restarts at each decode, so no window mixes two segments: the decoded embedding is the
    smoothed embedding of the new segment so far (the decoding step's), and while the window fills with the new
    segment the cosine anchor follows its mean (settling) instead of staying on that one step.
    ``state_nbytes``: the tensor state, (smooth, D) + (D,) floats whatever the stream's length.
    """

    def __init__(self, threshold: float, min_interval: float = 1.0, max_interval: float = 0.0, smooth: int = 1,
                 statistic: str = "cosine", drift: float = 0.1):
        if statistic not in STATISTICS:
            raise ValueError(f"OnlineDetector statistic '{statistic}' is unknown (expected one of {list(STATISTICS)})")
        for name, value in (("threshold", threshold), ("min_interval", min_interval), ("max_interval", max_interval),
                            ("drift", drift)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"OnlineDetector {name} must be a finite number >= 0, got {value!r}")
        if int(smooth) != smooth or smooth < 1:
            raise ValueError(f"OnlineDetector smooth must be an integer >= 1 (a window of embeddings), got {smooth!r}")
        if max_interval and max_interval < min_interval:
            raise ValueError(f"OnlineDetector max_interval {max_interval} is below min_interval {min_interval} "
                             f"(expected 0 for none, or >= min_interval)")
        self.threshold, self.min_interval = float(threshold), float(min_interval)
        self.max_interval = float(max_interval)
        self.smooth, self.statistic, self.drift = int(smooth), statistic, float(drift)
        self.decision_seconds, self.steps = 0.0, 0
        self._ring = _Ring(self.smooth)
        self._anchor: torch.Tensor | None = None  # cosine: last decoded (D,); cusum: the segment's sum (D,)
        self._last_t = -math.inf
        self._cusum = 0.0
        self._since_decode = 0  # steps since the last decode
        self._dim: int | None = None

    @property
    def state_nbytes(self) -> int:
        return self._ring.nbytes + (0 if self._anchor is None else self._anchor.nbytes)

    def _decide(self, t: float, embedding: torch.Tensor) -> Decode | None:
        embedding = _check_embedding(embedding, self._dim, self.steps)
        if self._anchor is None:
            self._dim = len(embedding)
            return self._decode(t, embedding, "first")
        total = self._ring.push(embedding)  # (D,) the smoothed embedding, up to its norm
        norm = max(float(total.norm()), _NORM_EPS)
        self._since_decode += 1
        since = t - self._last_t
        if self.max_interval and since >= self.max_interval - _TIME_EPS:
            return self._decode(t, embedding, "max_interval")
        if self.statistic == "cosine":
            alarm = 1.0 - float(total @ self._anchor) / norm > self.threshold
        else:  # the anchor is the sum of the segment's in-control smoothed embeddings
            cosine = float(total @ self._anchor) / (norm * max(float(self._anchor.norm()), _NORM_EPS))
            self._cusum = max(0.0, self._cusum + (1.0 - cosine) - self.drift)
            alarm = self._cusum > self.threshold
        if alarm and since >= self.min_interval - _TIME_EPS:
            return self._decode(t, embedding, "change")
        if self.statistic == "cosine" and self._since_decode < self.smooth:
            torch.div(total, norm, out=self._anchor)  # settling: the ring holds this segment's embeddings only
        elif self.statistic == "cusum" and self._cusum == 0.0:
            self._anchor.add_(total, alpha=1.0 / norm)  # in control: part of the segment's mean
        return None

    def _decode(self, t: float, embedding: torch.Tensor, reason: str) -> Decode:
        """Restart the smoothing at the decoding step, so no window mixes two segments: the decoded embedding is
        the smoothed one of the new segment so far (this step's)."""
        self._ring.reset()
        decoded = F.normalize(self._ring.push(embedding), dim=0)
        if self._anchor is None:
            self._anchor = decoded.clone()
        else:
            self._anchor.copy_(decoded)
        self._last_t, self._cusum, self._since_decode = t, 0.0, 0
        return Decode(t, self.steps, decoded.clone(), None, reason)


class UniformDetector(_Timed):
    """The baseline as a detector: a decode at the first step and then at the first step at or after each
    ``t0 + k * every`` (a fixed grid, so intervals do not drift); ``"first"`` then ``"uniform"``."""

    def __init__(self, every: float):
        if not (isinstance(every, (int, float)) and math.isfinite(every) and every > 0):
            raise ValueError(f"uniform decoding interval 'every' must be a number > 0 (seconds), got {every!r}")
        self.every = float(every)
        self.decision_seconds, self.steps = 0.0, 0
        self._t0: float | None = None
        self._next_k = 1

    def _decide(self, t: float, embedding: torch.Tensor) -> Decode | None:
        embedding = _check_embedding(embedding, None, self.steps)
        if self._t0 is None:
            self._t0 = t
            return Decode(t, self.steps, F.normalize(embedding, dim=0), None, "first")
        if t < self._t0 + self._next_k * self.every - _TIME_EPS:
            return None
        self._next_k = math.floor((t - self._t0) / self.every + _TIME_EPS) + 1
        return Decode(t, self.steps, F.normalize(embedding, dim=0), None, "uniform")


def run_online(steps: Iterable[tuple[float, torch.Tensor]], detector, decode_fn=None, on_decode=None) -> list[Decode]:
    """Feed ``(t, embedding (D,))`` steps to ``detector.step``; each decode gets ``text = decode_fn(emb (1, D))[0]``
    (when given) and goes to ``on_decode(decode)`` as it happens. Returns the decodes (a list that grows with the
    decodes, not with the steps)."""
    decodes = []
    for t, embedding in steps:
        decode = detector.step(t, embedding)
        if decode is None:
            continue
        if decode_fn is not None:
            decode.text = decode_fn(decode.embedding[None])[0]
        if on_decode is not None:
            on_decode(decode)
        decodes.append(decode)
    return decodes


def uniform_decodes(times, embeddings: torch.Tensor, every: float) -> list[Decode]:
    """times (T,), embeddings (T, D) -> a decode every ``every`` seconds, the first at ``times[0]``."""
    times, embeddings = _check_sequence(times, embeddings)
    return run_online(zip(times, embeddings), UniformDetector(every))


# ------------------------------------------------------------------------------------------------------ offline

def _check_sequence(times, embeddings: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    times = [float(t) for t in times]
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or len(embeddings) != len(times):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings {shape} do not match {len(times)} times (expected ({len(times)}, D))")
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("times must be non-decreasing (seconds of video time, one per embedding)")
    return times, embeddings


def offline_segments(embeddings: torch.Tensor, n_segments: int | None = None,
                     distance_threshold: float | None = None) -> list[tuple[int, int]]:
    """embeddings (T, D) -> contiguous segments ``[(start, end)]`` (end exclusive) covering 0..T in order.

    Ward agglomerative clustering (scikit-learn) with the chain graph of time neighbours as connectivity, so only
    adjacent runs merge and every cluster is a run. Give exactly one of ``n_segments`` (clamped to T) and
    ``distance_threshold`` (the Ward merge distance at which merging stops)."""
    if (n_segments is None) == (distance_threshold is None):
        raise ValueError(f"offline_segments needs exactly one of n_segments ({n_segments}) and distance_threshold "
                         f"({distance_threshold})")
    if n_segments is not None and (int(n_segments) != n_segments or n_segments < 1):
        raise ValueError(f"n_segments must be an integer >= 1, got {n_segments!r}")
    if distance_threshold is not None and not distance_threshold >= 0:
        raise ValueError(f"distance_threshold must be >= 0, got {distance_threshold!r}")
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError(f"offline_segments embeddings must be a (T, D) tensor, got "
                         f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)}")
    count = len(embeddings)
    if count == 0:
        return []
    if count == 1 or n_segments == 1:
        return [(0, count)]
    if n_segments is not None and n_segments >= count:
        return [(i, i + 1) for i in range(count)]
    try:
        import scipy.sparse
        from sklearn.cluster import AgglomerativeClustering
    except ImportError as err:
        raise ImportError(f"offline segmentation needs scikit-learn and scipy ({err}); "
                          f"pip install scikit-learn") from err

    chain = scipy.sparse.diags([1.0, 1.0], [-1, 1], shape=(count, count), format="csr")
    labels = AgglomerativeClustering(n_clusters=n_segments, distance_threshold=distance_threshold, linkage="ward",
                                     connectivity=chain).fit_predict(embeddings.detach().double().cpu().numpy())
    starts = [0] + [i for i in range(1, count) if labels[i] != labels[i - 1]]
    return list(zip(starts, starts[1:] + [count]))


def offline_decodes(times, embeddings: torch.Tensor, n_segments: int | None = None,
                    distance_threshold: float | None = None) -> list[Decode]:
    """times (T,), embeddings (T, D) -> one ``"segment"`` decode per ``offline_segments`` run, at its first step's
    time, of the L2-normalised mean embedding of the run."""
    times, embeddings = _check_sequence(times, embeddings)
    return [Decode(times[start], start, F.normalize(embeddings[start:end].float().mean(0), dim=0), None, "segment")
            for start, end in offline_segments(embeddings, n_segments, distance_threshold)]
