"""The run's settings as Flower carries them to the ServerApp and every ClientApp.

Flower hands both sides the same run config: ``[tool.flwr.app.config]`` in
pyproject.toml (every ``RunConfig`` field, with dashes, plus the app's own keys below),
overridden by ``flwr run --run-config``. Flower refuses an override whose key is not in
that section, so the section lists every field; ``tests/test_flower.py`` keeps it in
step with ``RunConfig``. TOML has no null: a nullable setting is null as ``""``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import config
from ..config import RunConfig

# The app's own keys, with their defaults (seconds, counts).
APP_DEFAULTS: dict[str, Any] = {
    # continue the run from the checkpoint in output-dir
    "resume": False,
    # where nodes keep their model (a node's --node-config cache-dir wins); "" = ~/.cache/ferret-fl
    "cache-dir": "",
    # how long a round waits for replies; a node that has not answered by then is left out of the round
    "round-timeout": 600.0,
    # how long the server waits for a node to name its partition and cache (a node that
    # stays silent is asked again next round while the SuperLink lists it)
    "query-timeout": 60.0,
    # how many nodes must be connected before round 1, and how long to wait for them
    "min-nodes": 1,
    "connect-timeout": 300.0,
}


@dataclass(frozen=True)
class AppSettings:
    resume: bool
    cache_dir: str
    round_timeout: float
    query_timeout: float
    min_nodes: int
    connect_timeout: float


def flower_key(name: str) -> str:
    """The run-config key of RunConfig field ``name``."""
    return name.replace("_", "-")


def parse(values: Mapping[str, Any]) -> tuple[RunConfig, AppSettings]:
    """(RunConfig, AppSettings) from a Flower run config; unknown keys are refused."""
    app = dict(APP_DEFAULTS)
    overrides = {}
    for key, value in values.items():
        if key in APP_DEFAULTS:
            app[key] = value
            continue
        name = key.replace("-", "_")
        if name not in config.FIELDS:
            raise ValueError(f"run config key {key!r} is neither a ferret-fl setting nor one of {sorted(APP_DEFAULTS)}")
        overrides[name] = value
    cfg = config.load(None, overrides)
    if not isinstance(app["resume"], bool):
        raise ValueError(f"resume must be true or false; got {app['resume']!r}")
    for key in ("round-timeout", "query-timeout", "connect-timeout"):
        if isinstance(app[key], bool) or not isinstance(app[key], (int, float)) or not app[key] > 0:
            raise ValueError(f"{key} must be a positive number of seconds; got {app[key]!r}")
    if isinstance(app["min-nodes"], bool) or not isinstance(app["min-nodes"], int) or app["min-nodes"] < 1:
        raise ValueError(f"min-nodes must be an int >= 1; got {app['min-nodes']!r}")
    return cfg, AppSettings(resume=app["resume"], cache_dir=str(app["cache-dir"]),
                            round_timeout=float(app["round-timeout"]), query_timeout=float(app["query-timeout"]),
                            min_nodes=app["min-nodes"],
                            connect_timeout=float(app["connect-timeout"]))


def as_run_config(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` as a run-config override (null as "")."""
    return {flower_key(k): ("" if v is None else v) for k, v in config.as_dict(cfg).items()}


def toml_lines(values: Mapping[str, Any]) -> str:
    """``values`` as TOML ``key = value`` lines (for ``flwr run --run-config FILE``)."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        out.append(f"{key} = {text}")
    return "\n".join(out) + "\n"


def run_key(cfg: RunConfig) -> str:
    """16 hex digits naming the run: equal for a resumed run (the settings a resume may
    change are left out), different for any other. Nodes keep their model under it."""
    from ..simulation import RESUMABLE_CHANGES

    kept = {k: v for k, v in config.as_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
