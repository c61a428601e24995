"""Selective decoding on video streams: caption quality against decode rate for three policies.

    python benchmarks/streaming.py --ckpt runs/vl_flickr --flickr ../shared/data/flickr8k-1k --out outputs/streaming \
        [--streams 5 --images-per-stream 12 --fps 2 --seed 0 --device cpu]

1. Streams: each a random sequence of distinct Flickr *test*-split images (``flickr_source(root, "test")``), written
   by ``benchmarks/stream_video.write_stream`` (each image 2-8 s, camera motion). Ground truth of a second: the
   5 captions of the image on screen.
2. Every stream is embedded once at ``--fps`` (``eval.streaming.embed_stream`` over ``VideoStream`` with the model's
   ``frame_embedder`` and its caption query); the (times, embeddings) are cached in ``<out>/embeddings/``.
3. Policies, all decoded by a ``CaptionBank`` of the train-split captions: uniform (decode every ``k`` s), online
   change detection (``OnlineDetector``, statistic cosine and cusum, a threshold sweep; replayed on the cached
   embeddings) and offline Ward segmentation (``offline_decodes``, ``n_segments`` = a fraction of the stream's
   seconds, so the fraction is roughly the decode rate).
4. Scoring, per whole second ``s`` of every stream, at the second's midpoint ``s + 0.5`` (so a second is never
   ambiguous at a boundary at an integer time): the decode *nearest in time* to it (ties to the earlier one; as in
   the VL-JEPA paper's evaluation, the decode may come after the second; ``--assign causal`` uses the latest decode
   at or before it instead, the first decode where there is none yet):
   - CIDEr-D of its text against the second's 5 captions (``eval.caption_metrics.cider_per_item``). CIDEr's
     document frequencies come from the reference corpus of *all seconds of all streams* (one document per
     second, so an image shown 6 s counts 6 times); that corpus is the same for every policy, so scores compare.
   - Retrieval accuracy: the decoded embedding's nearest caption, among all test-split captions (their Y-encoder
     embeddings), is one of the five captions of the image on screen. (A text-equality check cannot work here:
     the bank holds train captions only, never a test one.)
   Rate = decodes per second = all decodes / all stream seconds.
5. Output: a markdown table (also ``<out>/table.md``), ``<out>/curve.json`` and ``<out>/curve.png`` (quality vs
   rate); the decode-reduction factor at matched quality: with ``Q`` the quality of uniform 1 s, the lowest rate at
   which online / offline reach ``>= Q`` (linear interpolation on the curve sorted by rate), factor = uniform-1 s
   rate / that rate (= 1 / rate at exactly 1 Hz); and the online decision latency (mean detector seconds per step,
   mean delay from a true boundary to the first decode after it).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.stream_video import Segment, read_sidecar, write_stream  # noqa: E402

UNIFORM_EVERY = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
OFFLINE_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
# Online thresholds: on the cosine distance to the last decode's embedding, and on the CUSUM S of the distance to
# the segment mean above the detector's drift (0.1 per step).
COSINE_THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
CUSUM_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
REFERENCE = ("uniform", 1.0)  # the policy and parameter whose quality the others must match
ASSIGN_MODES = ("nearest", "causal")


# ------------------------------------------------------------------------------------------------- pure scoring

@dataclass
class StreamTruth:
    """One stream's ground truth: its video, duration (s) and segments with ``image_index`` = a *test-split* index."""
    name: str
    video: Path
    duration: float
    segments: list[Segment]


@dataclass
class Decoded:
    """A policy's decodes on one stream: times (K,) seconds, K texts, embeddings (K, D)."""
    times: np.ndarray
    texts: list[str]
    embeddings: torch.Tensor


def second_times(duration: float) -> np.ndarray:
    """The midpoints ``s + 0.5`` of the whole seconds ``s = 0 .. floor(duration) - 1``: (S,)."""
    return np.arange(int(np.floor(duration + 1e-9)), dtype=np.float64) + 0.5


def image_at(segments: list[Segment], times: np.ndarray) -> np.ndarray:
    """(S,) ``image_index`` of the segment on screen at each time (segments tile [0, end); start inclusive)."""
    starts = np.array([s.start for s in segments])
    if len(times) and (np.min(times) < starts[0] or np.max(times) >= segments[-1].end):
        raise ValueError(f"times {np.min(times)}..{np.max(times)} fall outside the segments "
                         f"[{starts[0]}, {segments[-1].end})")
    rows = np.searchsorted(starts, times, side="right") - 1
    return np.array([segments[r].image_index for r in rows], dtype=np.int64)


def assign_decodes(decode_times: np.ndarray, query_times: np.ndarray, mode: str = "nearest") -> np.ndarray:
    """(S,) index of the decode scored at each query time: ``nearest`` in time (ties to the earlier decode) or
    ``causal`` (the latest decode at or before; the first decode where none is yet). decode_times (K,) sorted."""
    if mode not in ASSIGN_MODES:
        raise ValueError(f"assign mode '{mode}' is unknown (expected one of {list(ASSIGN_MODES)})")
    decode_times = np.asarray(decode_times, dtype=np.float64)
    if len(decode_times) == 0:
        raise ValueError("no decodes to assign (expected a policy that decodes at least once per stream)")
    if np.any(np.diff(decode_times) < 0):
        raise ValueError(f"decode times are not sorted: {decode_times.tolist()}")
    query_times = np.asarray(query_times, dtype=np.float64)
    before = np.clip(np.searchsorted(decode_times, query_times, side="right") - 1, 0, len(decode_times) - 1)
    if mode == "causal":
        return before
    after = np.clip(before + 1, 0, len(decode_times) - 1)
    later_is_nearer = np.abs(decode_times[after] - query_times) < np.abs(decode_times[before] - query_times)
    return np.where(later_is_nearer, after, before)


def score_decodes(streams: list[StreamTruth], decoded: list[Decoded], captions_by_image: list[list[str]],
                  caption_emb: torch.Tensor, caption_image: torch.Tensor, mode: str = "nearest") -> dict:
    """One policy's scores over all streams: ``{decodes, seconds, rate, cider, retrieval}``.

    captions_by_image: the reference captions of every test image; caption_emb (M, D) normalised embeddings of all
    test captions, caption_image (M,) the test image of each. CIDEr's document frequencies come from the references
    of every scored second of every stream (one ``cider_per_item`` call).
    """
    from eval.caption_metrics import cider_per_item

    if len(streams) != len(decoded):
        raise ValueError(f"{len(decoded)} decode lists for {len(streams)} streams (expected one per stream)")
    references, hypotheses, hits = [], [], []
    decodes = seconds = 0.0
    for truth, policy in zip(streams, decoded):
        query = second_times(truth.duration)
        on_screen = image_at(truth.segments, query)
        chosen = assign_decodes(policy.times, query, mode)
        references += [captions_by_image[i] for i in on_screen]
        hypotheses += [policy.texts[i] for i in chosen]
        emb = torch.nn.functional.normalize(policy.embeddings.float(), dim=-1)[torch.as_tensor(chosen)]
        nearest = (emb @ caption_emb.float().T).argmax(1)
        hits.append(caption_image[nearest].cpu() == torch.as_tensor(on_screen))
        decodes += len(policy.times)
        seconds += truth.duration
    scores = cider_per_item(references, hypotheses)
    return {"decodes": int(decodes), "seconds": seconds, "rate": decodes / seconds,
            "cider": float(np.mean(scores)), "retrieval": torch.cat(hits).float().mean().item()}


def rate_at_quality(rates, qualities, target: float) -> float | None:
    """The lowest rate at which the curve (points sorted by rate, joined linearly) reaches ``quality >= target``;
    the lowest measured rate if that point already does (no extrapolation below it), None if no point does."""
    points = sorted(zip(map(float, rates), map(float, qualities)))
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (r0, q0), (r1, q1) in zip(points, points[1:]):
        if q0 < target <= q1:
            return r0 + (target - q0) * (r1 - r0) / (q1 - q0)
    return None


def boundary_delays(segments: list[Segment], decode_times) -> dict:
    """For every true boundary (a segment start after 0): the delay to the first decode at or after it and before
    the next boundary. ``{boundaries, detected, mean_delay_s (None if none detected), missed}``."""
    decode_times = np.sort(np.asarray(decode_times, dtype=np.float64))
    delays, missed = [], 0
    for segment in segments[1:]:
        later = decode_times[(decode_times >= segment.start) & (decode_times < segment.end)]
        if len(later):
            delays.append(float(later[0] - segment.start))
        else:
            missed += 1
    return {"boundaries": len(segments) - 1, "detected": len(delays),
            "mean_delay_s": float(np.mean(delays)) if delays else None, "missed": missed}


def matched_quality(rows: list[dict], metric: str) -> dict:
    """{policy: {rate, factor}} for each non-reference policy family, matched to the reference row's ``metric``."""
    ref = [r for r in rows if (r["policy"], r["value"]) == REFERENCE]
    if not ref:
        raise ValueError(f"no reference row {REFERENCE} among the curve rows")
    target, ref_rate = ref[0][metric], ref[0]["rate"]
    out = {"reference": {"policy": REFERENCE[0], "every_s": REFERENCE[1], metric: target, "rate": ref_rate}}
    if target <= 0:  # every policy "reaches" a zero quality at its lowest rate: no factor means anything
        out["reference"]["note"] = f"reference {metric} is {target}: no matched-quality factor"
    for policy in sorted({r["policy"] for r in rows} - {REFERENCE[0]}):
        family = [r for r in rows if r["policy"] == policy]
        rate = (rate_at_quality([r["rate"] for r in family], [r[metric] for r in family], target)
                if target > 0 else None)
        out[policy] = {"rate": rate, "factor": None if not rate else ref_rate / rate}
    return out


# ------------------------------------------------------------------------------------------------- the heavy parts

def build_streams(test_images: list[Path], count: int, per_stream: int, out: Path, seed: int, video_fps: int,
                  size: int) -> list[StreamTruth]:
    """``count`` streams of ``per_stream`` distinct test images each (``random.Random(seed)``); a stream whose
    sidecar already records the same images, seed, fps and size is reused, not rewritten."""
    if per_stream > len(test_images):
        raise ValueError(f"--images-per-stream {per_stream} exceeds the {len(test_images)} test images")
    rng = random.Random(seed)
    streams = []
    for number in range(count):
        chosen = rng.sample(range(len(test_images)), per_stream)
        paths = [test_images[i] for i in chosen]
        video = out / "videos" / f"stream{number:02d}.mp4"
        stream_seed = seed * 1000 + number
        sidecar = video.with_suffix(".json")
        record = read_sidecar(video) if sidecar.is_file() and video.is_file() else None
        if not (record and record["images"] == [str(p) for p in paths] and record["seed"] == stream_seed
                and record["fps"] == float(video_fps) and record["size"] == size):
            write_stream(paths, video, fps=video_fps, size=size, seed=stream_seed)
            record = read_sidecar(video)
        segments = [Segment(s["start"], s["end"], chosen[s["image_index"]]) for s in record["segments"]]
        streams.append(StreamTruth(video.stem, video, record["duration"], segments))
    return streams


def embed_streams(streams: list[StreamTruth], vl, fps: float, out: Path, device, batch: int = 8
                  ) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(times (T,), embeddings (T, D)) of every stream at ``fps``, cached in ``out/embeddings`` by checkpoint, fps,
    query and the video file's modification time."""
    from eval.streaming import VideoStream, embed_stream
    from eval.vl_embed import frame_embedder

    embed_fn = frame_embedder(vl.embedder, vl.caption_query, vl.img_size, device)
    cache_dir = out / "embeddings"
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for truth in streams:
        key = {"ckpt": str(Path(vl.ckpt).resolve()), "fps": float(fps), "query": vl.caption_query,
               "img_size": vl.img_size, "video_mtime_ns": truth.video.stat().st_mtime_ns}
        cache = cache_dir / f"{truth.name}.pt"
        if cache.is_file():
            stored = torch.load(cache, weights_only=True)
            if stored["key"] == json.dumps(key, sort_keys=True):
                result.append((stored["times"].numpy(), stored["embeddings"]))
                continue
        video = VideoStream(truth.video, fps=fps)
        steps = list(embed_stream(video, embed_fn, batch=batch))
        if getattr(video, "error", None):
            raise RuntimeError(f"decoding '{truth.video}' failed: {video.error}")
        if not steps:
            raise RuntimeError(f"'{truth.video}' gave no frames at fps={fps}")
        times = np.array([float(t) for t, _ in steps])
        embeddings = torch.stack([emb.detach().float().cpu() for _, emb in steps])
        torch.save({"key": json.dumps(key, sort_keys=True), "times": torch.from_numpy(times),
                    "embeddings": embeddings}, cache)
        result.append((times, embeddings))
    return result


def _decoded(decodes, bank) -> Decoded:
    """``eval.streaming.Decode`` list -> Decoded; decodes without text get the bank's (one batched look-up)."""
    decodes = sorted(decodes, key=lambda d: d.t)
    if not decodes:
        raise RuntimeError("a policy made no decode on a stream (expected at least one)")
    embeddings = torch.stack([torch.as_tensor(d.embedding).float().cpu() for d in decodes])
    texts = [d.text for d in decodes]
    missing = [i for i, text in enumerate(texts) if text is None]
    if missing:
        for i, text in zip(missing, bank.decode(embeddings[missing])):
            texts[i] = text
    return Decoded(np.array([float(d.t) for d in decodes]), [str(t) for t in texts], embeddings)


def run_policies(streams, cached, bank, min_interval: float, cosine_thresholds, cusum_thresholds,
                 offline_fractions, uniform_every):
    """Yield (policy, param name, value, [Decoded per stream], online extras or None) for every setting."""
    from eval.streaming import OnlineDetector, offline_decodes, run_online, uniform_decodes

    for every in uniform_every:
        yield "uniform", "every_s", every, [_decoded(uniform_decodes(t, e, every), bank) for t, e in cached], None
    for statistic, thresholds in (("cosine", cosine_thresholds), ("cusum", cusum_thresholds)):
        for threshold in thresholds:
            per_stream, extras = [], {"decision_s_per_step": [], "delays": []}
            for truth, (times, emb) in zip(streams, cached):
                detector = OnlineDetector(threshold, min_interval=min_interval, statistic=statistic)
                decodes = run_online(zip(times.tolist(), emb), detector, decode_fn=bank.decode)
                extras["decision_s_per_step"].append(detector.decision_seconds / detector.steps)
                per_stream.append(_decoded(decodes, bank))
                extras["delays"].append(boundary_delays(truth.segments, per_stream[-1].times))
            yield f"online-{statistic}", "threshold", threshold, per_stream, extras
    for fraction in offline_fractions:
        per_stream = []
        for truth, (times, emb) in zip(streams, cached):
            n = int(min(len(times), max(1, round(fraction * truth.duration))))
            per_stream.append(_decoded(offline_decodes(times, emb, n_segments=n), bank))
        yield "offline", "segments_per_s", fraction, per_stream, None


def _summarise_online(extras: dict) -> dict:
    delays = extras["delays"]
    detected = sum(d["detected"] for d in delays)
    mean_delay = (sum(d["mean_delay_s"] * d["detected"] for d in delays if d["detected"]) / detected
                  if detected else None)
    return {"decision_ms_per_step": 1e3 * float(np.mean(extras["decision_s_per_step"])),
            "boundary_delay_s": mean_delay, "boundaries": sum(d["boundaries"] for d in delays),
            "missed_boundaries": sum(d["missed"] for d in delays)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| policy | parameter | decodes/s | CIDEr | retrieval acc | boundary delay s | missed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        delay = "" if r.get("boundary_delay_s") is None else f"{r['boundary_delay_s']:.2f}"
        missed = "" if "missed_boundaries" not in r else f"{r['missed_boundaries']}/{r['boundaries']}"
        lines.append(f"| {r['policy']} | {r['param']}={r['value']:g} | {r['rate']:.3f} | {r['cider']:.3f} | "
                     f"{r['retrieval']:.3f} | {delay} | {missed} |")
    return "\n".join(lines)


def plot_curve(rows: list[dict], matched: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "cider", "CIDEr-D"), (axes[1], "retrieval", "caption retrieval acc")):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            family = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in family], [r[metric] for r in family], marker="o", label=policy)
        ax.axhline(matched[metric]["reference"][metric], color="grey", ls="--", lw=0.8, label="uniform 1 s")
        ax.set_xscale("log")
        ax.set_xlabel("decodes per second")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("selective decoding: quality vs decode rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from err
    if not values:
        raise argparse.ArgumentTypeError(f"'{text}' is empty (expected numbers, e.g. 0.1,0.2)")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a VL-JEPA training output or checkpoint folder")
    p.add_argument("--flickr", required=True, help="the Flickr8k-style folder (images/, captions.txt)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--streams", type=int, default=5)
    p.add_argument("--images-per-stream", type=int, default=12)
    p.add_argument("--fps", type=float, default=2.0, help="embedding rate (frames per second read from a stream)")
    p.add_argument("--video-fps", type=int, default=10, help="frame rate of the written streams")
    p.add_argument("--size", type=int, default=128, help="side of the written streams' frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="frames per embedding call")
    p.add_argument("--assign", choices=ASSIGN_MODES, default="nearest")
    p.add_argument("--min-interval", type=float, default=0.5, help="online: fewest seconds between two decodes")
    p.add_argument("--uniform-every", type=_floats, default=UNIFORM_EVERY)
    p.add_argument("--cosine-thresholds", type=_floats, default=COSINE_THRESHOLDS)
    p.add_argument("--cusum-thresholds", type=_floats, default=CUSUM_THRESHOLDS)
    p.add_argument("--offline-fractions", type=_floats, default=OFFLINE_FRACTIONS,
                   help="offline n_segments as a fraction of the stream's seconds")
    args = p.parse_args(argv)
    if REFERENCE[1] not in args.uniform_every:
        p.error(f"--uniform-every must include {REFERENCE[1]} (the matched-quality reference)")
    for name in ("streams", "images_per_stream"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} (expected >= 1)")
    return args


def main(argv=None) -> dict:
    from data.vl_sources import flickr_source
    from eval.decode import CaptionBank
    from eval.vl_embed import embed_texts, load_vl

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    test, train = flickr_source(args.flickr, "test"), flickr_source(args.flickr, "train")
    vl = load_vl(args.ckpt)
    vl.embedder.to(device)

    start = time.perf_counter()
    streams = build_streams(test.images, args.streams, args.images_per_stream, args.out, args.seed,
                            args.video_fps, args.size)
    cached = embed_streams(streams, vl, args.fps, args.out, device, args.batch)
    print(f"{len(streams)} streams, {sum(s.duration for s in streams):.1f} s, "
          f"{sum(len(t) for t, _ in cached)} embedded frames ({time.perf_counter() - start:.1f} s)", flush=True)

    bank_texts = list(dict.fromkeys(pair.target for pair in train.pairs))
    bank = CaptionBank(bank_texts, embed_texts(vl.embedder, bank_texts, device).cpu())
    captions_by_image = test.captions_by_image()
    test_captions = [c for caps in captions_by_image for c in caps]
    caption_image = torch.tensor([i for i, caps in enumerate(captions_by_image) for _ in caps])
    caption_emb = embed_texts(vl.embedder, test_captions, device).cpu()

    rows = []
    for policy, param, value, decoded, extras in run_policies(
            streams, cached, bank, args.min_interval, args.cosine_thresholds, args.cusum_thresholds,
            args.offline_fractions, args.uniform_every):
        row = {"policy": policy, "param": param, "value": value,
               **score_decodes(streams, decoded, captions_by_image, caption_emb, caption_image, args.assign)}
        if extras is not None:
            row.update(_summarise_online(extras))
        rows.append(row)

    matched = {metric: matched_quality(rows, metric) for metric in ("cider", "retrieval")}
    online = [r for r in rows if r["policy"].startswith("online")]
    latency = {"decision_ms_per_step": float(np.mean([r["decision_ms_per_step"] for r in online])),
               "boundary_delay_s": {f"{r['policy']}@{r['value']:g}": r["boundary_delay_s"] for r in online}}
    table = markdown_table(rows)
    print(table)
    for metric, result in matched.items():
        ref = result["reference"]
        print(f"\nmatched {metric} (uniform 1 s: {ref[metric]:.3f} at {ref['rate']:.3f} decodes/s):")
        if "note" in ref:
            print(f"  {ref['note']}")
            continue
        for policy, entry in result.items():
            if policy != "reference":
                print(f"  {policy}: " + ("never reaches it" if entry["rate"] is None else
                                         f"rate {entry['rate']:.3f}/s, decode-reduction x{entry['factor']:.2f}"))
    print(f"\nonline decision time: {latency['decision_ms_per_step']:.3f} ms per step (mean over settings)")

    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "protocol": {"assign": args.assign, "query_times": "midpoint of every whole second",
                            "cider_df": "references of all seconds of all streams",
                            "retrieval": "nearest test caption (Y-encoder) of the decoded embedding is one of the "
                                         "on-screen image's captions",
                            "bank": f"{len(bank)} distinct train-split captions"},
               "streams": [{"name": s.name, "video": str(s.video), "duration": s.duration,
                            "segments": [asdict(x) for x in s.segments]} for s in streams],
               "rows": rows, "matched": matched, "latency": latency}
    (args.out / "curve.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "table.md").write_text(table + "\n")
    plot_curve(rows, matched, args.out / "curve.png")
    print(f"\nwrote {args.out / 'curve.json'}, {args.out / 'table.md'}, {args.out / 'curve.png'}")
    return summary


if __name__ == "__main__":
    main()
