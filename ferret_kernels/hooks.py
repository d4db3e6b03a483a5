"""Hugging Face ``transformers.Trainer`` integration: one Ferret client round per ``train()``.

    cb = FerretCallback(plan, round=r, seed=s)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    payload = wire.encode_client_update(cb.update)

``on_train_begin`` snapshots the trainable parameters (after the optimizer is built and
before the first step); ``on_train_end`` compresses delta = w_start - w_end with one
``project_blocks`` launch and, by default (``restore=True``), puts the model back to
w_start so that the round's ``GlobalUpdate`` can be applied to it; pass restore=False to
keep the locally trained weights (e.g. to evaluate them). ``num_samples`` defaults to the
size of the training dataset. Single-process training only: each process would
compress its own copy.

transformers is imported on first use of ``FerretCallback``, so ``ferret_kernels`` and
this module import without it.
"""

from __future__ import annotations

from .client import ClientRound
from .messages import ClientUpdate
from .plan import FerretPlan


def _dataset_size(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None


def _build():
    from transformers import TrainerCallback

    class FerretCallback(TrainerCallback):
        """A ``TrainerCallback`` running one ``ClientRound`` around ``Trainer.train()``.

        plan: the FerretPlan (from this model). round, seed: this round's number and the
        seed the server announced. num_samples: weight for sample-count aggregation
        (default: len(train_dataset)). Other keyword arguments go to ``ClientRound``
        (snapshot_device, restore, allocation, counts, backend). After ``train()``,
        ``update`` holds the ClientUpdate. ``next_round(round, seed)`` re-arms it for the
        next ``train()`` call.
        """

        def __init__(self, plan: FerretPlan, *, round: int, seed: int, num_samples: int | None = None, **options):
            if not isinstance(plan, FerretPlan):
                raise TypeError(f"plan must be a FerretPlan; got {type(plan).__name__}")
            self.plan = plan
            self.round = round
            self.seed = seed
            self.num_samples = num_samples
            self.options = options
            self.client_round: ClientRound | None = None
            self.update: ClientUpdate | None = None

        def next_round(self, round: int, seed: int) -> None:
            self.round, self.seed = round, seed
            self.client_round = self.update = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise RuntimeError("FerretCallback needs the model: the Trainer passed none to on_train_begin")
            model = getattr(model, "module", model)
            self.update = None
            self.client_round = ClientRound(self.plan, model, round=self.round, seed=self.seed, **self.options).begin()

        def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
            if self.client_round is None:
                return
            samples = self.num_samples or _dataset_size(train_dataloader) or 1
            self.update = self.client_round.compress(num_samples=samples)
            self.client_round = None

    FerretCallback.__module__ = __name__
    return FerretCallback


def __getattr__(name: str):
    if name == "FerretCallback":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
