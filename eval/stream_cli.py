"""``jepa stream``: caption a video with a VL-JEPA model, decoding text only when the meaning changes.

    jepa stream --video clip.mp4 --ckpt runs/vl_flickr [--mode online|offline|uniform] [--fps 2]
                [--threshold 0.1] [--min-interval 1] [--max-interval 0] [--smooth 3] [--statistic cosine|cusum]
                [--every 1] [--segments N] [--query TEXT] [--bank FLICKR_ROOT] [--jsonl OUT] [--srt OUT]

Frames (``eval.streaming.VideoStream`` at ``--fps``) are embedded with the model's prediction for the query
(``eval.vl_embed.frame_embedder``); a decode turns an embedding into the nearest train caption of the Flickr folder
``--bank`` (``eval.decode.CaptionBank``; default: the model's training data.root). ``online`` and ``uniform`` print
each decode as it happens, ``offline`` (Ward segmentation of the whole stream) after the stream. Then a summary:
decodes, decodes per second of video, stream seconds, mean decision latency. ``--jsonl``: one ``{"t", "text",
"reason"}`` object a decode, written as it happens; ``--srt``: subtitles, each decode shown until the next one.
A truncated or corrupt video (or Ctrl-C) keeps and writes the decodes so far, then exits with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from jepa.precision import PRECISIONS, autocast_context, resolve_precision

from .streaming import (Decode, OnlineDetector, STATISTICS, UniformDetector, VideoStream, embed_stream,
                        offline_decodes, run_online)

MODES = ("online", "offline", "uniform")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jepa stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True, help="video file (mp4, avi, mkv, ...)")
    parser.add_argument("--ckpt", required=True, help="VL-JEPA training output or checkpoint folder")
    parser.add_argument("--mode", default="online", choices=MODES)
    parser.add_argument("--fps", type=float, default=2.0, help="frames embedded per second of video (default 2)")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="online: cosine distance (cosine) or CUSUM bound (cusum) that triggers a decode")
    parser.add_argument("--statistic", default="cosine", choices=STATISTICS, help="online change statistic")
    parser.add_argument("--drift", type=float, default=0.1, help="cusum: per-step distance tolerated as noise")
    parser.add_argument("--min-interval", type=float, default=1.0, help="online: seconds between decodes, at least")
    parser.add_argument("--max-interval", type=float, default=0.0, help="online: force a decode after this many "
                        "seconds (0: never)")
    parser.add_argument("--smooth", type=int, default=3, help="online: moving average over this many embeddings")
    parser.add_argument("--window", type=int, default=1, help="embed each step as the mean of the last N frames")
    parser.add_argument("--batch", type=int, default=1, help="frames embedded per model call (adds latency)")
    parser.add_argument("--every", type=float, default=None, help="uniform: seconds between decodes (default 1)")
    parser.add_argument("--segments", type=int, default=None, help="offline: number of segments")
    parser.add_argument("--distance-threshold", type=float, default=None,
                        help="offline: Ward merge distance where merging stops (instead of --segments)")
    parser.add_argument("--query", default=None, help="text query (default: the model's training caption query)")
    parser.add_argument("--bank", default=None, help="Flickr-style folder whose train captions are the decode bank "
                        "(default: the model's data.root when it trained on flickr)")
    parser.add_argument("--split-file", default=None, help="the bank folder's split file (default: the model's "
                        "data.split_file, else the packaged Flickr8k-1k split)")
    parser.add_argument("--jsonl", default=None, help="write the decodes here (JSON lines t, text, reason)")
    parser.add_argument("--srt", default=None, help="write SRT subtitles here")
    parser.add_argument("--threads", type=int, default=1, help="video decoding threads")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 autocast on CUDA")
    args = parser.parse_args(argv)
    if args.mode == "offline" and (args.segments is None) == (args.distance_threshold is None):
        parser.error("--mode offline needs one of --segments N and --distance-threshold X")
    if args.mode != "offline" and (args.segments is not None or args.distance_threshold is not None):
        parser.error(f"--segments / --distance-threshold are for --mode offline, not '{args.mode}'")
    if args.mode != "uniform" and args.every is not None:
        parser.error(f"--every is for --mode uniform, not '{args.mode}'")
    args.every = 1.0 if args.every is None else args.every
    return args


def format_line(decode: Decode) -> str:
    """``[  12.5 s] change  a dog runs on the grass``"""
    return f"[{decode.t:6.1f} s] {decode.reason:<7} {decode.text}"


def srt_time(seconds: float) -> str:
    """Seconds -> ``HH:MM:SS,mmm``."""
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def write_srt(path: str | Path, decodes: list[Decode], end: float) -> None:
    """One cue per decode, shown from its time until the next decode (the last until ``end``)."""
    cues = []
    for number, decode in enumerate(decodes, 1):
        until = decodes[number].t if number < len(decodes) else max(end, decode.t)
        cues.append(f"{number}\n{srt_time(decode.t)} --> {srt_time(until)}\n{decode.text}\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(cues), encoding="utf-8")


class JsonlWriter:
    """Appends one decode a line, flushed, so a stream that ends badly keeps what was decoded."""

    def __init__(self, path: str | Path | None):
        self.handle = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "w", encoding="utf-8")

    def write(self, decode: Decode) -> None:
        if self.handle is not None:
            record = {"t": round(decode.t, 6), "text": decode.text, "reason": decode.reason}
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def build_bank(vl, bank: str | None, split_file: str | None, device, autocast):
    """The ``CaptionBank`` of the distinct train captions of the Flickr folder ``bank`` (default: the model's)."""
    from data.vl_sources import flickr_source

    from .decode import CaptionBank
    from .vl_embed import embed_texts

    data = vl.cfg.data
    if bank is None:
        if data.source != "flickr":
            raise SystemExit(f"jepa stream: the model trained on data.source '{data.source}', which has no caption "
                             f"bank; pass --bank FLICKR_ROOT (a folder with images/ and captions.txt)")
        bank = data.root
    split_file = split_file or data.split_file or None
    captions = flickr_source(bank, "train", split_file).targets
    return CaptionBank(captions, embed_texts(vl.embedder, captions, device, autocast=autocast)), bank, len(captions)


def main(argv: list[str] | None = None) -> list[Decode]:
    """Run ``jepa stream``; returns the decodes. A stream that ends early exits (SystemExit) after writing them."""
    from .vl_embed import frame_embedder, load_vl

    args = parse_args(sys.argv[1:] if argv is None else argv)
    stream = VideoStream(args.video, args.fps, args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vl = load_vl(args.ckpt)
    vl.embedder.to(device)
    autocast = autocast_context(resolve_precision(args.precision, device.type), device.type)
    query = args.query if args.query is not None else vl.caption_query
    bank, bank_root, bank_size = build_bank(vl, args.bank, args.split_file, device, autocast)
    print(f"stream {args.video} at {args.fps:g} fps, {args.mode} decoding, query {query!r}, bank of {bank_size} "
          f"captions from {bank_root}, on {device}", flush=True)
    embed = frame_embedder(vl.embedder, query, vl.img_size, device, autocast)
    steps = embed_stream(stream, embed, batch=args.batch, window=args.window)
    jsonl = JsonlWriter(args.jsonl)

    def emit(decode: Decode) -> None:
        print(format_line(decode), flush=True)
        jsonl.write(decode)

    def keep(decode: Decode) -> None:  # online / uniform: kept as they happen, so an interruption loses none
        decodes.append(decode)
        emit(decode)

    decodes: list[Decode] = []
    last_t, interrupted, decision_ms = None, False, 0.0
    times, embeddings = [], []

    def timed_steps():
        nonlocal last_t
        for t, emb in steps:
            last_t = t
            yield t, emb

    started = time.perf_counter()
    try:
        if args.mode == "offline":
            for t, emb in timed_steps():
                times.append(t)
                embeddings.append(emb)
        else:
            detector = (UniformDetector(args.every) if args.mode == "uniform" else
                        OnlineDetector(args.threshold, args.min_interval, args.max_interval, args.smooth,
                                       args.statistic, args.drift))
            try:
                run_online(timed_steps(), detector, bank.decode, keep)
            finally:
                decision_ms = detector.mean_decision_ms
    except KeyboardInterrupt:
        interrupted = True
    try:
        if times:  # offline: segment what was embedded (all of it, or up to the damage / interruption)
            clustering = time.perf_counter()
            decodes = offline_decodes(times, torch.stack(embeddings), args.segments, args.distance_threshold)
            decision_ms = 1000 * (time.perf_counter() - clustering) / len(times)
            for decode, text in zip(decodes, bank.decode(torch.stack([d.embedding for d in decodes]))):
                decode.text = text
                emit(decode)
    finally:
        jsonl.close()
    wall = time.perf_counter() - started
    seconds = 0.0 if last_t is None else last_t + 1 / args.fps  # the last frame is shown for one sampling period
    if stream.duration:
        seconds = min(seconds, stream.duration)
    if args.srt:
        write_srt(args.srt, decodes, seconds)
    rate = len(decodes) / seconds if seconds else 0.0
    print(f"summary: {len(decodes)} decodes over {seconds:.1f} s of stream ({rate:.2f} per second), "
          f"decision latency {decision_ms:.3f} ms per step (mean), {wall:.1f} s wall", flush=True)
    written = " and ".join(p for p in (args.jsonl, args.srt) if p)
    kept = f"kept the {len(decodes)} decodes so far" + (f" (written to {written})" if written else "")
    if interrupted:
        raise SystemExit(f"jepa stream: interrupted; {kept}")
    if stream.error is not None:
        raise SystemExit(f"jepa stream: {stream.error}; {kept}")
    return decodes
