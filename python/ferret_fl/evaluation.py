"""Evaluation: held-out loss and Rouge-L F1 of greedy generations.

Rouge-L follows the paper: F1 of ``rouge_score``'s rougeL between the generated response
and the reference, averaged over samples, in percent; greedy decoding, 128 new tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# The paper's generation budget for Rouge-L.
MAX_NEW_TOKENS = 128


@torch.no_grad()
def mean_loss(model, batches: Iterable[dict]) -> float:
    """Token-weighted mean cross-entropy over batches of input_ids / attention_mask / labels."""
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for b in batches:
        labels = b["labels"].to(device)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        n = int((shift_labels != -100).sum())
        total += float(loss)
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def generate_greedy(model, tokenizer, examples: Sequence, max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 8, max_length: int = 1024) -> list[str]:
    """Greedy responses to each example's Alpaca prompt (batched, left-padded)."""
    from .data import collate_prompts, tokenize_prompt

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            prompts = [tokenize_prompt(ex, tokenizer, max_length) for ex in examples[i:i + batch_size]]
            enc = {k: v.to(device) for k, v in collate_prompts(prompts, tokenizer.pad_token_id).items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [o.strip() for o in outputs]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F1 in percent."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)
