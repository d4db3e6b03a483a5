"""One entry point from a data spec string (``--data``, the ``data:`` config key) to a dataset."""

from __future__ import annotations

from .dolly import DOLLY_HUB_ID, load_dolly
from .natural_instructions import load_natural_instructions, load_ni_subset
from .synthetic import load_synthetic
from .types import FederatedDataset

DATA_SPECS = (
    "ni-subset (the shipped Super-NaturalInstructions subset), synthetic (the generated test benchmark), "
    "dolly (Dolly-15K from the hub), dolly:<file.jsonl>, ni:<Natural Instructions checkout>"
)


def load_data(
    spec: str,
    *,
    seed: int = 42,
    num_clients: int = 200,
    dirichlet_alpha: float = 0.5,
    min_client_samples: int = 10,
) -> FederatedDataset:
    """The :class:`FederatedDataset` a data spec names.

    spec: "ni-subset", "synthetic", "dolly", "dolly:<file.jsonl>" or "ni:<directory>".
    seed: the data seed: the synthetic instances, Dolly's Dirichlet split and NI's 20% / 2% samples.
        Keep it fixed across training seeds so that runs compare on the same clients and the same
        held-out examples (``ni-subset`` ignores it: it ships every instance it uses).
    num_clients, dirichlet_alpha, min_client_samples: the Dolly split only; NI and the synthetic
        benchmark have one client per training task.

    Raises ValueError naming the accepted forms for any other spec.
    """
    kind, sep, location = spec.partition(":")
    if spec == "ni-subset":
        return load_ni_subset()
    if spec == "synthetic":
        return load_synthetic(seed=seed)
    if kind == "dolly":
        if sep and not location:
            raise ValueError("data 'dolly:' needs a JSONL path after the colon (or use 'dolly' for the hub)")
        return load_dolly(location or DOLLY_HUB_ID, num_clients=num_clients, alpha=dirichlet_alpha,
                          min_samples_per_client=min_client_samples, seed=seed)
    if kind == "ni" and sep:
        if not location:
            raise ValueError("data 'ni:<directory>' needs the Natural Instructions checkout directory")
        return load_natural_instructions(location, seed=seed)
    raise ValueError(f"data must be one of: {DATA_SPECS}; got {spec!r}")
