"""The run's FedPipe settings, parsed and checked before any model or data is loaded."""

from __future__ import annotations

import importlib.util

from . import planner, quantize


def parse_list(spec: str, name: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{name} must be a comma-separated list; got {spec!r}")
    return items


def parse_ranks(spec: str) -> list[int]:
    try:
        ranks = [int(r) for r in parse_list(spec, "fedpipe_ranks")]
    except ValueError:
        raise ValueError(f"fedpipe_ranks must be comma-separated integers (e.g. 2,4,8,16); got {spec!r}") from None
    if min(ranks) < 1 or sorted(set(ranks)) != ranks:
        raise ValueError(f"fedpipe_ranks must be distinct increasing integers >= 1; got {spec!r}")
    return ranks


def parse_precisions(spec: str) -> tuple[str, ...]:
    return quantize.check_precisions(parse_list(spec, "fedpipe_precisions"))


def check_settings(cfg) -> None:
    """Every FedPipe setting of ``cfg`` parses, and what it asks for is installed."""
    planner.parse_profiles(cfg.fedpipe_profiles)
    parse_ranks(cfg.fedpipe_ranks)
    parse_list(cfg.fedpipe_targets, "fedpipe_targets")
    precisions = parse_precisions(cfg.fedpipe_precisions)
    if set(precisions) - {"none"} and importlib.util.find_spec("optimum.quanto") is None:
        raise ValueError(f"fedpipe_precisions {list(precisions)} need optimum-quanto: pip install optimum-quanto (the "
                         "project's `fedpipe` extra; make install has it), or set fedpipe_precisions=none")
