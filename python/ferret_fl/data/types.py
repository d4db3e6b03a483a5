"""The common shape every data source returns: examples, clients and a federated dataset.

All three sources (Dolly-15K, Natural Instructions v2.8 and the shipped synthetic benchmark)
produce a :class:`FederatedDataset`: one :class:`ClientData` per client (each a tuple of
:class:`Example`), plus evaluation examples. Nothing here is tokenized; see
``ferret_fl.data.prompts`` for prompts, tokenization and collation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction-following sample.

    instruction: the task description (NI "Definition", Dolly "instruction").
    input: the instance's input or context; "" when there is none (Alpaca's no-input template).
    output: the reference answer (the training target and the Rouge-L reference).
    task: the task or category it comes from (NI task name, Dolly category, synthetic task).
    """

    instruction: str
    input: str
    output: str
    task: str = ""


@dataclass(frozen=True)
class ClientData:
    """The local dataset of one federated client: a name and its examples (in a fixed order)."""

    name: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


@dataclass(frozen=True)
class FederatedDataset:
    """Clients for training plus held-out data for evaluation.

    name: which source built it ("dolly", "natural_instructions", "ni-subset", "synthetic").
    clients: one entry per client, N = len(clients); client i is ``clients[i]``.
    eval_examples: examples of tasks (or categories) no client trains on: the paper's metric
        (Rouge-L on unseen tasks). Concatenated over ``eval_tasks``, task by task.
    eval_tasks: names of the held-out tasks/categories, in the order they appear above.
    seen_task_eval_examples: held-out instances of the training tasks, disjoint from every
        client's examples; empty for Dolly and Natural Instructions, which the paper evaluates
        on unseen tasks only.
    """

    name: str
    clients: tuple[ClientData, ...]
    eval_examples: tuple[Example, ...]
    eval_tasks: tuple[str, ...]
    seen_task_eval_examples: tuple[Example, ...] = field(default=())

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def client_sizes(self) -> list[int]:
        """Number of examples per client, ``[len(c) for c in clients]``."""
        return [len(client) for client in self.clients]

    @property
    def train_tasks(self) -> tuple[str, ...]:
        """Distinct tasks/categories present in the clients' data, sorted."""
        return tuple(sorted({ex.task for client in self.clients for ex in client.examples}))

    def eval_examples_by_task(self) -> dict[str, list[Example]]:
        """``eval_examples`` grouped by task, keys in ``eval_tasks`` order (for per-task scores)."""
        grouped: dict[str, list[Example]] = {task: [] for task in self.eval_tasks}
        for ex in self.eval_examples:
            grouped.setdefault(ex.task, []).append(ex)
        return grouped
