"""Pack what the VL-JEPA GPU benchmark needs into ``.gpu_vl/`` (< 64 MiB, the device tool's limit), and unpack it there.

    python benchmarks/pack_vl_gpu.py pack   [--out .gpu_vl]          # here, with ../shared/data and the packages
    python benchmarks/pack_vl_gpu.py unpack [--src .gpu_vl]          # on the GPU machine

- ``minilm/``: the packaged all-MiniLM-L6-v2 in bf16 (config and tokenizer files as they are). Its word-embedding
  table (30,522 x 384, half of the model) is cut to the rows of the tokens that the benchmark's texts use (Flickr8k-1k
  captions, easy-VQA questions and answers, Imagenette prompts, the caption query, special tokens); ``unpack``
  rebuilds a full fp32 folder with zeros in the other rows, so every benchmark text embeds exactly as with the bf16
  model (a text with another token would not: the benchmark has none; ``unpack`` re-checks).
- ``data.zip``: Flickr8k-1k (images resized to a short side of 128 px (the benchmark's input size), JPEG quality 80; captions.txt as is) and
  Imagenette (train and val as they are, 128 px).
- the easy-VQA wheel (it carries its data), copied from ``.whl/``.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
WORD_KEY = "embeddings.word_embeddings.weight"


def benchmark_texts() -> list[str]:
    import easy_vqa

    from data.vl_sources import IMAGENETTE_CLASSNAMES, class_prompts, flickr_source
    from jepa.methods.vljepa import VLDataConfig

    texts = [VLDataConfig().caption_query]
    for split in ("train", "val", "test"):
        source = flickr_source(SHARED / "flickr8k-1k", split)
        texts += [p.target for p in source.pairs]
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        texts += list(questions) + list(answers)
    texts += list(easy_vqa.get_answers()) + class_prompts(list(IMAGENETTE_CLASSNAMES.values()))
    return texts


def used_token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = set(tokenizer.all_special_ids)
    for start in range(0, len(texts), 4096):
        for row in tokenizer(texts[start:start + 4096])["input_ids"]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.int64)


def pack(out: Path) -> None:
    from transformers import AutoTokenizer

    from encoders.text import minilm_path

    src = minilm_path()
    out.mkdir(parents=True, exist_ok=True)
    minilm = out / "minilm"
    minilm.mkdir(exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt") and path.name != "data_config.json":
            shutil.copy2(path, minilm / path.name)
    state = load_file(str(src / "model.safetensors"))
    ids = used_token_ids(AutoTokenizer.from_pretrained(str(src), local_files_only=True), benchmark_texts())
    packed = {k: v.to(torch.bfloat16) for k, v in state.items() if k != WORD_KEY}
    packed["used_ids"] = ids
    packed["word_rows"] = state[WORD_KEY][ids].to(torch.bfloat16)
    packed["vocab_size"] = torch.tensor(state[WORD_KEY].shape[0])
    save_file(packed, str(minilm / "packed.safetensors"))
    print(f"minilm: {len(ids)} of {state[WORD_KEY].shape[0]} word rows kept")

    with zipfile.ZipFile(out / "data.zip", "w", zipfile.ZIP_STORED) as zf:
        _add_flickr(zf, SHARED / "flickr8k-1k")
        for path in sorted((SHARED / "imagenette" / "val").rglob("*.JPEG")):  # zero-shot classification
            zf.write(path, f"imagenette/{path.relative_to(SHARED / 'imagenette')}")
    wheel = sorted((ROOT / ".whl").glob("easy_vqa-*.whl"))
    if not wheel:
        raise SystemExit("no easy_vqa wheel in .whl/ (pip download easy-vqa==1.0 --no-deps -d .whl)")
    shutil.copy2(wheel[-1], out / wheel[-1].name)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB")


def _add_flickr(zf: zipfile.ZipFile, root: Path, short_side: int = 128) -> None:
    from PIL import Image

    zf.write(root / "captions.txt", "flickr8k-1k/captions.txt")
    for path in sorted((root / "images").iterdir()):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = short_side / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
        zf.writestr(f"flickr8k-1k/images/{path.name}", buffer.getvalue())


def unpack(src: Path) -> None:
    packed = load_file(str(src / "minilm" / "packed.safetensors"))
    ids, rows = packed.pop("used_ids"), packed.pop("word_rows")
    vocab = int(packed.pop("vocab_size"))
    table = torch.zeros(vocab, rows.shape[1])
    table[ids] = rows.float()
    state = {k: v.float() for k, v in packed.items()}
    state[WORD_KEY] = table
    folder = src / "minilm_fp32"
    folder.mkdir(exist_ok=True)
    for path in (src / "minilm").iterdir():
        if path.name != "packed.safetensors":
            shutil.copy2(path, folder / path.name)
    save_file(state, str(folder / "model.safetensors"))
    with zipfile.ZipFile(src / "data.zip") as zf:
        zf.extractall(src / "data")
    from transformers import AutoTokenizer

    missing = sorted(set(used_token_ids(AutoTokenizer.from_pretrained(str(folder)), benchmark_texts_on_device(src))
                         .tolist()) - set(ids.tolist()))
    if missing:
        raise SystemExit(f"{len(missing)} token ids of the benchmark texts are not in the packed table: {missing[:10]}")
    print(json.dumps({"minilm": str(folder), "data": str(src / "data"), "word_rows": len(ids)}))


def benchmark_texts_on_device(src: Path) -> list[str]:
    global SHARED
    SHARED = src / "data"
    return benchmark_texts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("--dir", default=str(ROOT / ".gpu_vl"))
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(Path(args.dir))


if __name__ == "__main__":
    main()
