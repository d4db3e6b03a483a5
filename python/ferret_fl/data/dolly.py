"""Dolly-15K as a non-IID federation (the Ferret / FedKSeed setup).

Rows come from the hub (``databricks/databricks-dolly-15k`` through ``datasets``, imported only
when used) or from a local JSONL file in the upstream format, one object per line with the
string fields ``instruction``, ``context``, ``response`` and ``category``.

Categories are coded by their alphabetical rank. For the eight Dolly categories:

    0 brainstorming, 1 classification, 2 closed_qa, 3 creative_writing, 4 general_qa,
    5 information_extraction, 6 open_qa, 7 summarization

One category (the paper's 7, summarization) is held out for evaluation; the rest are split over
N clients by a Dirichlet(alpha) label split with at least ``min_samples_per_client`` each.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .partition import dirichlet_label_split, named_rng
from .types import ClientData, Example, FederatedDataset

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_CATEGORIES = (
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
)
_FIELDS = ("instruction", "context", "response", "category")


def _row_to_example(row: dict, where: str) -> Example:
    missing = [name for name in _FIELDS if name not in row]
    if missing:
        raise ValueError(f"{where}: Dolly row lacks field(s) {missing}")
    return Example(
        instruction=str(row["instruction"]),
        input=str(row["context"] or ""),
        output=str(row["response"]),
        task=str(row["category"]),
    )


def read_dolly_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from a local Dolly JSONL file (blank lines skipped), in file order.

    Each example is (instruction, input=context, output=response, task=category).
    """
    examples = []
    with open(path, encoding="utf-8") as reader:
        for line_number, line in enumerate(reader, start=1):
            if line.strip():
                examples.append(_row_to_example(json.loads(line), f"{path}:{line_number}"))
    return examples


def read_dolly_hub(repo_id: str = DOLLY_HUB_ID, split: str = "train") -> list[Example]:
    """Examples from the hub through ``datasets.load_dataset`` (needs the ``datasets`` package
    and network access or a warm ``datasets`` cache)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            "loading Dolly from the hub needs the `datasets` package (pip install datasets); "
            "or pass the path of a local databricks-dolly-15k.jsonl"
        ) from err
    return [_row_to_example(dict(row), f"{repo_id}[{i}]") for i, row in enumerate(load_dataset(repo_id, split=split))]


def category_codes(examples: list[Example]) -> tuple[tuple[str, ...], np.ndarray]:
    """(categories sorted alphabetically, int64 code per example, shape [n]) — code = rank."""
    categories = tuple(sorted({ex.task for ex in examples}))
    rank = {name: code for code, name in enumerate(categories)}
    return categories, np.array([rank[ex.task] for ex in examples], dtype=np.int64)


def load_dolly(
    source: str | os.PathLike = DOLLY_HUB_ID,
    *,
    num_clients: int = 200,
    alpha: float = 0.5,
    heldout_category: str | int = "summarization",
    min_samples_per_client: int = 10,
    max_eval_examples: int | None = None,
    seed: int = 42,
) -> FederatedDataset:
    """Dolly-15K split over ``num_clients`` clients, one category held out for evaluation.

    source: a local JSONL path (used when it exists on disk or ends in .jsonl), else
        a hub dataset id.
    heldout_category: a category name, or its alphabetical code (the paper's ``zerotask=7``).
    max_eval_examples: keep a seeded random subset of the held-out category of at most this
        size (None keeps all, as the paper does); order within the subset follows the source.
    seed: fixes the Dirichlet split and the eval subset; the same seed gives the same dataset.

    Returns clients named ``client_000``, ... in split order; ``eval_tasks`` is
    ``(heldout_category,)``. Raises ValueError for an unknown category or when the training rows
    cannot give every client ``min_samples_per_client``.
    """
    path = os.fspath(source)
    if os.path.exists(path) or path.endswith(".jsonl"):
        examples = read_dolly_jsonl(path)
    else:
        examples = read_dolly_hub(path)
    categories, codes = category_codes(examples)
    if isinstance(heldout_category, int):
        if not 0 <= heldout_category < len(categories):
            raise ValueError(f"heldout_category code {heldout_category} not in 0..{len(categories) - 1} {categories}")
        heldout_name = categories[heldout_category]
    elif heldout_category in categories:
        heldout_name = heldout_category
    else:
        raise ValueError(f"heldout_category {heldout_category!r} not among {categories}")

    heldout_code = categories.index(heldout_name)
    train_indices = np.flatnonzero(codes != heldout_code)
    eval_indices = np.flatnonzero(codes == heldout_code)
    if max_eval_examples is not None and len(eval_indices) > max_eval_examples:
        chosen = named_rng(seed, "dolly-eval").choice(len(eval_indices), size=max_eval_examples, replace=False)
        eval_indices = eval_indices[np.sort(chosen)]

    parts = dirichlet_label_split(
        codes[train_indices],
        num_clients=num_clients,
        alpha=alpha,
        min_samples=min_samples_per_client,
        rng=named_rng(seed, "dolly-dirichlet"),
    )
    width = max(3, len(str(num_clients - 1)))
    clients = tuple(
        ClientData(f"client_{i:0{width}d}", tuple(examples[train_indices[j]] for j in part))
        for i, part in enumerate(parts)
    )
    return FederatedDataset(
        name="dolly",
        clients=clients,
        eval_examples=tuple(examples[i] for i in eval_indices),
        eval_tasks=(heldout_name,),
    )
