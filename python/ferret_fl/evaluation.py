"""Evaluation: a fixed held-out set, greedy generation, Rouge-L (two definitions), exact match.

    eval_set = build_eval_set(dataset)                    # every held-out task, equal count, seed 0
    result = evaluate_model(model, tokenizer, eval_set)    # generates, then scores every example
    result.mean("rouge_l_paper"), result.per_task("exact_match")
    echo = score_predictions(echo_predictions(eval_set), eval_set)   # the echo-the-input baseline

Metrics, per example, in percent (0-100):

- ``rouge_l_paper``: Rouge-L F as the Ferret reference code computes it (``evaluations.py``:
  pltrdy ``rouge`` 1.0.1, ``Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]``; FedKSeed's code
  does the same). Case-sensitive; the text is cut into "sentences" at every ".", the periods
  dropped; each sentence's whitespace is collapsed and it is split on single spaces; other
  punctuation stays attached to words ("Yes," differs from "Yes"). Summary-level LCS with the
  package's default ``exclusive=True``: words are counted as sets (distinct words), the LCS of
  every (reference sentence, hypothesis sentence) pair is taken as a set of words and unioned, and
  F = 2PR / (P + R + 1e-8) with P = |union| / distinct hypothesis words, R = |union| / distinct
  reference words. An empty hypothesis, or one with no text between periods, scores 0 (the
  reference code returns 0 where the package raises). The reference is the example's output
  string; the reference code decodes its tokenized target, which gives the same text up to the
  tokenizer's round trip.
- ``rouge_l_google``: Google's ``rouge-score`` ``rougeL`` (sentence-level LCS) with its default
  tokenizer: lower-cased, every character outside [a-z0-9] replaced by a space (so punctuation and
  non-ASCII letters vanish), no stemming; F = 2PR / (P + R) over token counts (repeats count).
  Super-NaturalInstructions' own scripts use the same scorer with ``use_stemmer=True``.
- ``exact_match``: 100 when prediction and reference are equal after Super-NaturalInstructions'
  normalisation (lower-case, ASCII punctuation removed, whitespace collapsed), else 0.

The paper reports the mean of ``rouge_l_paper`` over examples.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import Example, FederatedDataset, collate_prompts, named_rng, tokenize_prompt
from .models import response_loss

# The paper's generation budget (greedy decoding, 128 new tokens).
MAX_NEW_TOKENS = 128
# Seed of the evaluation-set draw: a constant, never the training seed, so that every run of a
# comparison is scored on the same examples.
EVAL_SET_SEED = 0
METRICS = ("rouge_l_paper", "rouge_l_google", "exact_match")
METRIC_LABELS = {
    "rouge_l_paper": "Rouge-L (Ferret code)",
    "rouge_l_google": "Rouge-L (rouge-score)",
    "exact_match": "exact match",
}


# ---- the evaluation set ----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples, ``per_task`` of each task in ``tasks``, grouped task by task.

    examples: N = len(tasks) * per_task examples; examples[k * per_task:(k + 1) * per_task] are
        those of tasks[k], in their source order.
    seed: the seed of the draw (see :func:`build_eval_set`).
    """

    examples: tuple[Example, ...]
    tasks: tuple[str, ...]
    per_task: int
    seed: int

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def example_tasks(self) -> tuple[str, ...]:
        """The task of every example, shape [N]."""
        return tuple(ex.task for ex in self.examples)


def build_eval_set(
    dataset: FederatedDataset, per_task: int | None = None, seed: int = EVAL_SET_SEED
) -> EvalSet:
    """Every held-out task of ``dataset`` with the same number of examples each.

    per_task: examples per task; None takes the size of the smallest task (all of it for the
        shipped NI subset: 16 per task). Each task's examples are drawn without replacement from
        the stream (seed, task name), so a task's draw does not depend on the other tasks.
    seed: the evaluation-set seed; keep the default across training seeds.

    Raises ValueError when a task has fewer than ``per_task`` examples (naming it) or the dataset
    has no held-out example.
    """
    grouped = {task: examples for task, examples in dataset.eval_examples_by_task().items() if examples}
    if not grouped:
        raise ValueError(f"dataset {dataset.name!r} has no held-out examples to evaluate on")
    smallest = min(len(examples) for examples in grouped.values())
    if per_task is None:
        per_task = smallest
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1; got {per_task}")
    short = {task: len(examples) for task, examples in grouped.items() if len(examples) < per_task}
    if short:
        raise ValueError(
            f"per_task={per_task} but held-out task(s) have fewer examples: {short}; use per_task <= {smallest}"
        )
    chosen: list[Example] = []
    for task, examples in grouped.items():
        picks = named_rng(seed, f"eval-set/{task}").choice(len(examples), size=per_task, replace=False)
        chosen.extend(examples[i] for i in sorted(picks.tolist()))
    return EvalSet(tuple(chosen), tuple(grouped), per_task, seed)


def sized_eval_set(dataset: FederatedDataset, total: int, seed: int = EVAL_SET_SEED) -> EvalSet:
    """:func:`build_eval_set` with about ``total`` examples: ``total // tasks`` per held-out task,
    at least 1 and at most the smallest task holds (so every task counts equally)."""
    if total < 1:
        raise ValueError(f"total must be >= 1 held-out examples; got {total}")
    sizes = [len(examples) for examples in dataset.eval_examples_by_task().values() if examples]
    if not sizes:
        raise ValueError(f"dataset {dataset.name!r} has no held-out examples to evaluate on")
    return build_eval_set(dataset, per_task=max(1, min(total // len(sizes), min(sizes))), seed=seed)


# ---- metrics ---------------------------------------------------------------------------------


def _paper_sentences(text: str) -> list[list[str]]:
    # pltrdy rouge 1.0.1: pieces between periods, empty pieces dropped, whitespace collapsed,
    # then split on single spaces (a whitespace-only piece becomes the one word "").
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], hypothesis: list[str]) -> list[str]:
    """One longest common subsequence, chosen by the package's backtracking rule (on a tie,
    step back in the hypothesis), which matters because the words are then taken as a set."""
    n, m = len(reference), len(hypothesis)
    table = np.zeros((n + 1, m + 1), dtype=np.int32)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                table[i, j] = table[i - 1, j - 1] + 1
            else:
                table[i, j] = max(table[i - 1, j], table[i, j - 1])
    words, i, j = [], n, m
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1, j] > table[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_paper(prediction: str, reference: str) -> float:
    """Rouge-L F in percent as the Ferret reference code computes it (see the module docstring)."""
    hypothesis = _paper_sentences(prediction)
    reference_sentences = _paper_sentences(reference)
    if not prediction or not hypothesis or not reference_sentences:
        return 0.0
    reference_words = {word for sentence in reference_sentences for word in sentence}
    hypothesis_words = {word for sentence in hypothesis for word in sentence}
    union: set[str] = set()
    for ref_sentence in reference_sentences:
        for hyp_sentence in hypothesis:
            union.update(_lcs_words(ref_sentence, hyp_sentence))
    recall = len(union) / len(reference_words)
    precision = len(union) / len(hypothesis_words)
    return 100.0 * 2.0 * precision * recall / (precision + recall + 1e-8)


_GOOGLE_SCORER = None


def rouge_l_google(prediction: str, reference: str) -> float:
    """Rouge-L F in percent from Google's ``rouge-score`` (rougeL, default tokenizer, no stemmer)."""
    global _GOOGLE_SCORER
    if _GOOGLE_SCORER is None:
        from rouge_score import rouge_scorer

        _GOOGLE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100.0 * _GOOGLE_SCORER.score(target=reference, prediction=prediction)["rougeL"].fmeasure


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Super-NaturalInstructions' answer normalisation: lower-case, drop ASCII punctuation,
    collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> float:
    """100.0 if the normalised prediction equals the normalised reference, else 0.0."""
    return 100.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


SCORERS: dict[str, Callable[[str, str], float]] = {
    "rouge_l_paper": rouge_l_paper,
    "rouge_l_google": rouge_l_google,
    "exact_match": exact_match,
}


def rouge_l(predictions: Sequence[str], references: Sequence[str], variant: str = "rouge_l_google") -> float:
    """Mean Rouge-L F in percent over pairs; ``variant`` is "rouge_l_paper" or "rouge_l_google"."""
    if variant not in ("rouge_l_paper", "rouge_l_google"):
        raise ValueError(f"variant must be 'rouge_l_paper' or 'rouge_l_google'; got {variant!r}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = SCORERS[variant]
    return float(np.mean([scorer(p, r) for p, r in zip(predictions, references, strict=True)]))


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """Per-example scores of one model (or baseline) on one evaluation set.

    tasks: the task of each example, [N]. predictions: the generated (or baseline) texts, [N].
    scores: metric name -> float64 array [N] in percent, for every name in ``METRICS``.
    """

    tasks: tuple[str, ...]
    predictions: tuple[str, ...]
    scores: Mapping[str, np.ndarray]

    def mean(self, metric: str = "rouge_l_paper") -> float:
        """Mean over examples; with equal examples per task, also the mean of the task means."""
        return float(np.mean(self._metric(metric)))

    def per_task(self, metric: str = "rouge_l_paper") -> dict[str, float]:
        """Task -> mean score, tasks in evaluation-set order."""
        values = self._metric(metric)
        order = list(dict.fromkeys(self.tasks))
        labels = np.array(self.tasks)
        return {task: float(values[labels == task].mean()) for task in order}

    def _metric(self, metric: str) -> np.ndarray:
        if metric not in self.scores:
            raise KeyError(f"unknown metric {metric!r}; scored: {sorted(self.scores)}")
        return self.scores[metric]

    def to_dict(self) -> dict:
        """Plain JSON-able form (lists), read back by :meth:`from_dict`."""
        return {"tasks": list(self.tasks), "predictions": list(self.predictions),
                "scores": {name: values.tolist() for name, values in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> EvalResult:
        scores = {name: np.asarray(values, dtype=np.float64) for name, values in data["scores"].items()}
        n = len(data["tasks"])
        if len(data["predictions"]) != n or any(len(v) != n for v in scores.values()):
            raise ValueError("evaluation result: tasks, predictions and scores differ in length")
        return cls(tuple(data["tasks"]), tuple(data["predictions"]), scores)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as writer:
            json.dump(self.to_dict(), writer, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> EvalResult:
        with open(path, encoding="utf-8") as reader:
            return cls.from_dict(json.load(reader))


def score_predictions(predictions: Sequence[str], eval_set: EvalSet | Sequence[Example]) -> EvalResult:
    """Score ``predictions[i]`` against example i's output with every metric in ``METRICS``."""
    examples = eval_set.examples if isinstance(eval_set, EvalSet) else tuple(eval_set)
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    scores = {
        name: np.array([scorer(p, ex.output) for p, ex in zip(predictions, examples, strict=True)], dtype=np.float64)
        for name, scorer in SCORERS.items()
    }
    return EvalResult(tuple(ex.task for ex in examples), tuple(predictions), scores)


def echo_predictions(eval_set: EvalSet | Sequence[Example]) -> list[str]:
    """The echo-the-input baseline: each example's input as its prediction (no model needed)."""
    examples = eval_set.examples if isinstance(eval_set, EvalSet) else eval_set
    return [ex.input for ex in examples]


# ---- generation and loss -----------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model, batches: Iterable[dict]) -> float:
    """Token-weighted mean cross-entropy over batches of input_ids / attention_mask / labels."""
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for b in batches:
        total += float(response_loss(model, b["input_ids"], b["attention_mask"], b["labels"], reduction="sum"))
        tokens += int((b["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def generate_greedy(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 8, max_length: int = 1024, progress: bool = False) -> list[str]:
    """Greedy responses to each example's Alpaca prompt, in the order of ``examples``.

    Prompts are batched by length (longest first, so that padding is small and an out-of-memory
    batch shows at once), left-padded, and decoded up to eos or ``max_new_tokens``; special tokens
    are skipped and surrounding whitespace stripped.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1; got {max_new_tokens}, {batch_size}")
    device = next(model.parameters()).device
    prompts = [tokenize_prompt(ex, tokenizer, max_length) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            enc = {k: v.to(device) for k, v in collate_prompts([prompts[i] for i in rows], tokenizer.pad_token_id).items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs


def evaluate_model(model, tokenizer, eval_set: EvalSet, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                   max_length: int = 1024, progress: bool = False) -> EvalResult:
    """Generate greedily for every example of ``eval_set`` and score the responses."""
    predictions = generate_greedy(model, tokenizer, eval_set.examples, max_new_tokens, batch_size, max_length, progress)
    return score_predictions(predictions, eval_set)


# ---- tables ----------------------------------------------------------------------------------


def task_table(results: Mapping[str, EvalResult], metric: str = "rouge_l_paper") -> str:
    """Markdown table: one row per task, one column per named result, then the overall mean."""
    if not results:
        raise ValueError("no results to tabulate")
    names = list(results)
    tasks = list(results[names[0]].per_task(metric))
    per_task = {name: result.per_task(metric) for name, result in results.items()}
    lines = [f"| task ({METRIC_LABELS.get(metric, metric)}) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    lines += [f"| {task} | " + " | ".join(f"{per_task[name].get(task, float('nan')):.1f}" for name in names) + " |"
              for task in tasks]
    lines.append("| **mean** | " + " | ".join(f"**{results[name].mean(metric):.1f}**" for name in names) + " |")
    return "\n".join(lines)


def summary_table(results: Mapping[str, EvalResult], metrics: Sequence[str] = METRICS) -> str:
    """Markdown table: one row per named result, one column per metric (means over examples)."""
    lines = ["| row | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(f"{result.mean(m):.2f}" for m in metrics) + " |"
              for name, result in results.items()]
    return "\n".join(lines)


# ---- baselines from the command line -----------------------------------------------------------


def target_token_lengths(eval_set: EvalSet, tokenizer) -> np.ndarray:
    """Tokens each reference needs, eos included, int64 [N]: what ``max_new_tokens`` must cover."""
    return np.array([len(tokenizer(ex.output, add_special_tokens=False)["input_ids"]) + 1 for ex in eval_set.examples],
                    dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ferret_fl.evaluation``: the echo and no-training baselines on a data spec's
    evaluation set, with per-task tables, the reference-length distribution and the timing."""
    import argparse
    import os
    import time

    from .data import DATA_SPECS, load_data
    from .models import load_causal_lm

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--data", default="ni-subset", help=DATA_SPECS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-task", type=int, default=None, help="examples per held-out task (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="generate for the first N examples only (timing)")
    parser.add_argument("--no-model", action="store_true", help="echo baseline only")
    parser.add_argument("--out", default=None, help="directory for baseline_<name>.json per-example results")
    args = parser.parse_args(argv)

    eval_set = build_eval_set(load_data(args.data), per_task=args.per_task)
    results = {"echo": score_predictions(echo_predictions(eval_set), eval_set)}
    print(f"evaluation set: {len(eval_set.tasks)} tasks x {eval_set.per_task} examples (seed {eval_set.seed})")
    if not args.no_model:
        model, tokenizer = load_causal_lm(args.model)
        lengths = target_token_lengths(eval_set, tokenizer)
        q = np.percentile(lengths, [50, 90, 95, 99]).astype(int).tolist()
        print(f"reference tokens incl. eos: median {q[0]}, p90 {q[1]}, p95 {q[2]}, p99 {q[3]}, max {lengths.max()}; "
              f"{int((lengths > args.max_new_tokens).sum())} longer than max_new_tokens={args.max_new_tokens}")
        examples = eval_set.examples[: args.limit]
        start, cpu_start = time.perf_counter(), time.process_time()
        predictions = generate_greedy(model, tokenizer, examples, args.max_new_tokens, args.batch_size, progress=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        new_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions]
        # CPU seconds are reported beside wall seconds: on a shared machine they are the steadier cost.
        print(f"generation: {len(examples)} examples in {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
              f"({seconds / len(examples):.3f} s/example wall, "
              f"{torch.get_num_threads()} threads, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}); "
              f"response tokens median {int(np.median(new_tokens))}, "
              f"{sum(n >= args.max_new_tokens - 1 for n in new_tokens)} hit the cap")
        if args.limit is None:
            results["no-training"] = score_predictions(predictions, eval_set)
    print(summary_table(results))
    for metric in METRICS:
        print()
        print(task_table(results, metric))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, result in results.items():
            result.save(os.path.join(args.out, f"baseline_{name}.json"))


if __name__ == "__main__":
    main()
