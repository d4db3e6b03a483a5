"""Alpaca prompts, supervised tokenization with prompt masking, and batch collation.

Training sequence of one example (token ids, 1-D):

    input_ids = prompt_ids + target_ids + [eos_id]          (then cut to max_length)
    labels    = [-100] * len(prompt_ids) + target_ids + [eos_id]

The prompt and the target are tokenized separately and concatenated, so the label boundary is
exact; tokenizing the joined text and re-tokenizing the prompt to find its length (as the Alpaca
and Ferret code do) misplaces it whenever the tokenizer merges characters across the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .types import Example

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 1024

# Stanford Alpaca's two templates, verbatim (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the
# target follows "### Response:" directly, with no separator, as in Alpaca and the Ferret code.
# The Ferret code's NI loader uses the with-input template verbatim; its Dolly loader (from
# FederatedScope) ends the preamble with "Write a response for the task request." instead.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(example: Example) -> str:
    """The prompt-only text (everything before the response) for training and for generation.

    Uses the with-input template when ``example.input`` is non-blank, else the no-input one
    (Alpaca's rule; the Ferret NI code always uses the with-input template, and NI inputs are
    almost never empty, so the two rarely differ there).
    """
    if example.input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=example.instruction)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token first")
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: input_ids and labels, both int64 tensors of shape [L], L <= max_length.

    labels[i] == IGNORE_INDEX (-100) over the prompt, input_ids[i] over the target and eos.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_target_tokens(self) -> int:
        """Supervised positions left after truncation (0 when the prompt filled the window)."""
        return int((self.labels != IGNORE_INDEX).sum())


def tokenize_example(example: Example, tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> TokenizedExample:
    """Tokenize ``format_prompt(example)`` + ``example.output`` + eos with the prompt masked.

    The prompt is encoded with the tokenizer's special tokens (a BOS if it adds one), the target
    without. Sequences longer than ``max_length`` are cut on the right, as the reference code
    does: a long target loses its tail (and eos); a prompt of >= max_length tokens leaves no
    supervised position (``num_target_tokens == 0``), which a trainer should skip.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    prompt_ids = _encode(tokenizer, format_prompt(example), add_special_tokens=True)
    target_ids = _encode(tokenizer, example.output, add_special_tokens=False) + [_eos_id(tokenizer)]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return TokenizedExample(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def tokenize_examples(
    examples: Sequence[Example], tokenizer, max_length: int = DEFAULT_MAX_LENGTH
) -> list[TokenizedExample]:
    """``tokenize_example`` over a sequence; the list works directly as a torch Dataset."""
    return [tokenize_example(ex, tokenizer, max_length) for ex in examples]


def tokenize_prompt(example: Example, tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """Prompt-only ids for generation, int64 tensor of shape [P], P <= max_length.

    Over-long prompts are cut on the left, unlike training sequences, so that the
    "### Response:" cue the model answers after is kept.
    """
    ids = _encode(tokenizer, format_prompt(example), add_special_tokens=True)
    return torch.tensor(ids[-max_length:], dtype=torch.long)


def _pad(sequences: Sequence[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if left:
            out[row, width - len(seq) :] = seq
        else:
            out[row, : len(seq)] = seq
    return out


def _attention_mask(lengths: Sequence[int], width: int, left: bool) -> torch.Tensor:
    # Built from the lengths, not from input_ids != pad_id: many causal LMs (SmolLM2 included)
    # pad with their eos id, and the eos that ends each target must stay attended.
    positions = torch.arange(width).unsqueeze(0)
    lengths_t = torch.tensor(lengths, dtype=torch.long).unsqueeze(1)
    mask = positions >= width - lengths_t if left else positions < lengths_t
    return mask.long()


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch of B sequences to the longest, T.

    Returns int64 tensors of shape [B, T]: ``input_ids`` (padded with ``pad_token_id``),
    ``attention_mask`` (1 on real tokens, 0 on padding) and ``labels`` (padded with -100).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    input_ids = _pad([item.input_ids for item in batch], pad_token_id, left=False)
    labels = _pad([item.labels for item in batch], IGNORE_INDEX, left=False)
    mask = _attention_mask([len(item.input_ids) for item in batch], input_ids.shape[1], left=False)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad B prompt id tensors for batched generation (new tokens follow every row's end).

    Returns int64 ``input_ids`` and ``attention_mask``, both [B, T].
    """
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    input_ids = _pad(prompts, pad_token_id, left=True)
    mask = _attention_mask([len(p) for p in prompts], input_ids.shape[1], left=True)
    return {"input_ids": input_ids, "attention_mask": mask}


@dataclass(frozen=True)
class Collator:
    """A DataLoader ``collate_fn`` bound to a pad id: ``Collator(tokenizer.pad_token_id)``."""

    pad_token_id: int

    def __call__(self, batch: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)
