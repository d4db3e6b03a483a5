"""Natural Instructions v2.8 from a local checkout, with the Ferret paper's filters.

Expected layout (the upstream repository allenai/natural-instructions):

    <root>/splits/default/train_tasks.txt   one task name per line (no .json)
    <root>/splits/default/test_tasks.txt
    <root>/tasks/<task>.json                {"Definition": [str, ...],
                                             "Instances": [{"id": str, "input": str,
                                                            "output": [str, ...]}, ...], ...}

Training: one client per training task; keep instances whose input is shorter than 1024
characters, drop tasks left with fewer than 20, then sample 20% of each task's instances.
Evaluation: every test task, length-filtered the same way, at most max(20, 2% of its
instances). Instruction = the Definition, target = output[0].
"""

from __future__ import annotations

import dataclasses
import json
import os

from .partition import named_rng
from .types import ClientData, Example, FederatedDataset


def read_task_list(path: str | os.PathLike) -> list[str]:
    """Task names from a split file, one a line; blank lines skipped, a trailing .json removed."""
    with open(path, encoding="utf-8") as reader:
        names = [line.strip() for line in reader]
    return [name.removesuffix(".json") for name in names if name]


def read_task(root: str | os.PathLike, task: str, max_input_chars: int) -> list[Example]:
    """Examples of ``tasks/<task>.json`` whose input has fewer than ``max_input_chars`` characters.

    The Definition list is joined with blank lines (upstream files hold one string, so this is
    Definition[0] as in the reference code). Instances with an empty output list are skipped:
    they have no target.
    """
    path = os.path.join(root, "tasks", f"{task}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file missing for split entry {task!r}: {path}")
    with open(path, encoding="utf-8") as reader:
        raw = json.load(reader)
    definition = raw["Definition"]
    instruction = "\n\n".join(definition) if isinstance(definition, list) else str(definition)
    return [
        Example(instruction=instruction, input=item["input"], output=item["output"][0], task=task)
        for item in raw["Instances"]
        if len(item["input"]) < max_input_chars and item["output"]
    ]


def eval_cap(num_instances: int, fraction: float = 0.02, minimum: int = 20) -> int:
    """How many instances a test task keeps: all if at most ``minimum``, else max(minimum, int(fraction*n))."""
    return min(num_instances, max(minimum, int(fraction * num_instances)))


def _sample(examples: list[Example], size: int, seed: int, stream: str) -> list[Example]:
    if size >= len(examples):
        return list(examples)
    chosen = named_rng(seed, stream).choice(len(examples), size=size, replace=False)
    return [examples[i] for i in sorted(chosen.tolist())]


def load_natural_instructions(
    root: str | os.PathLike,
    *,
    max_input_chars: int = 1024,
    min_instances: int = 20,
    train_fraction: float = 0.2,
    eval_fraction: float = 0.02,
    eval_min_instances: int = 20,
    seed: int = 42,
) -> FederatedDataset:
    """Natural Instructions v2.8 as one client per training task plus the test tasks for evaluation.

    root: the checkout's top directory (holding ``splits/`` and ``tasks/``).
    min_instances: training tasks with fewer instances after the length filter are dropped.
    train_fraction: each kept training task contributes int(train_fraction * n) instances.
    eval_fraction, eval_min_instances: test-task cap, see :func:`eval_cap`.
    seed: every task is sampled from its own stream of (seed, task name), so one task's sample
        does not depend on which other tasks are listed.

    Returns clients named after their tasks in train_tasks.txt order; ``eval_tasks`` lists the
    test tasks that kept at least one instance, in test_tasks.txt order.
    """
    splits = os.path.join(root, "splits", "default")
    clients = []
    for task in read_task_list(os.path.join(splits, "train_tasks.txt")):
        examples = read_task(root, task, max_input_chars)
        if len(examples) < min_instances:
            continue
        size = int(len(examples) * train_fraction)
        # int() rounds 20% of a small task to 0 only when min_instances < 5; an empty client
        # could never train, so it is dropped like a filtered task.
        if size == 0:
            continue
        clients.append(ClientData(task, tuple(_sample(examples, size, seed, f"ni-train:{task}"))))

    eval_examples: list[Example] = []
    eval_tasks = []
    for task in read_task_list(os.path.join(splits, "test_tasks.txt")):
        examples = read_task(root, task, max_input_chars)
        if not examples:
            continue
        cap = eval_cap(len(examples), eval_fraction, eval_min_instances)
        eval_examples.extend(_sample(examples, cap, seed, f"ni-eval:{task}"))
        eval_tasks.append(task)
    return FederatedDataset(
        name="natural_instructions",
        clients=tuple(clients),
        eval_examples=tuple(eval_examples),
        eval_tasks=tuple(eval_tasks),
    )


NI_SUBSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ni_subset")


def load_ni_subset(root: str | os.PathLike = NI_SUBSET_DIR) -> FederatedDataset:
    """The Super-NaturalInstructions subset shipped with the package (``ni_subset/README.md``).

    Read by :func:`load_natural_instructions` with the paper's filters (input < 1024 characters,
    >= 20 instances per training task), but keeping every instance: the subset is already a sample
    (24 instances per training task, 16 per held-out task), so the paper's 20% / 2% sampling would
    leave 4 examples per client. The result does not depend on any seed, so the data is the same
    for every training seed.

    Returns 26 clients (one per training task, named after it) and 13 held-out tasks of 16
    examples each (208 ``eval_examples``), ``name == "ni-subset"``.
    """
    if not os.path.isdir(os.path.join(root, "tasks")):
        raise FileNotFoundError(
            f"the shipped NI subset is missing at {root}: reinstall ferret-kernels, or rebuild it with "
            "`python -m ferret_fl.data.ni_subset_build --source <upstream subset dir>`"
        )
    full = load_natural_instructions(root, train_fraction=1.0, eval_fraction=1.0, eval_min_instances=0, seed=0)
    return dataclasses.replace(full, name="ni-subset")
