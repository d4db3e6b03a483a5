"""A node's model between messages: the node-local cache.

The deployment engine starts a fresh ClientApp process for every message, so a node
keeps the global weights it reached on disk, one directory per run and partition:

    <cache-dir>/<run key>/partition-<p>/   a ``checkpoint`` directory: state.json
                                           (round, digest) and model-<round>.safetensors

``round`` k means the weights after k rounds (the weights round k + 1 starts from);
``digest`` is their ``weights_digest``. Writes go through ``checkpoint.save`` (files
first, then state.json atomically), so a node killed while saving keeps the previous
round. Reading the state needs no torch: the query handler stays fast.
"""

from __future__ import annotations

import json
import os
import re

# checkpoint.STATE_FILE (not imported: checkpoint imports torch)
STATE_FILE = "state.json"
DEFAULT_ROOT = os.path.join("~", ".cache", "ferret-fl", "flower")
RUN_KEY = re.compile(r"[0-9a-f]{16}")


def directory(root: str, run_key: str, partition_id: int) -> str:
    """The cache directory of ``partition_id`` in run ``run_key`` under ``root`` ("" = default)."""
    if not RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key must be 16 lowercase hex digits; got {run_key!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise ValueError(f"partition-id must be an int >= 0; got {partition_id!r}")
    return os.path.join(os.path.expanduser(root or DEFAULT_ROOT), run_key, f"partition-{partition_id}")


def read_state(path: str) -> dict | None:
    """{"round": k, "digest": ...} of the cache in ``path``, or None if there is none."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: the node starts over from the initial weights
    if not isinstance(state.get("round"), int) or not isinstance(state.get("digest"), str):
        return None
    return {"round": state["round"], "digest": state["digest"]}


def save(path: str, model, round_index: int, digest: str) -> None:
    """Keep ``model``'s weights as those after ``round_index`` rounds."""
    from .. import checkpoint

    checkpoint.save(path, model, {}, {"round": round_index, "digest": digest})


def load(path: str, model) -> dict | None:
    """Load the cached weights into ``model``; their state, or None (model untouched) if none."""
    from .. import checkpoint

    state = read_state(path)
    if state is None:
        return None
    checkpoint.load(path, model)
    return state
