"""The per-round metrics file: its name, its row schema, and reading and writing it.

A run directory holds ``metrics.jsonl``, one JSON object per line: round 0 (before
training) and then one row per finished round. Every number is measured: bytes are the
lengths of the encoded messages, seconds are wall-clock per phase. The simulation writes
rows with ``initial_row`` / ``round_row``; the report and the tests read them with
``read``, which checks each row against the schema below.
"""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"

# Wall-clock phases of a round, the keys of a row's "seconds".
PHASES = ("local", "compress", "aggregate", "apply", "evaluation")

# Keys of every row, with their JSON types.
ROW_KEYS: dict[str, type | tuple[type, ...]] = {
    "round": int,  # 0 = before training
    "algorithm": str,
    "eval_loss": (int, float),  # held-out loss after the round
    "bytes_up": int,  # all uploads of the round
    "bytes_down": int,  # downlink size x clients of the round
    "cumulative_bytes": int,  # up + down since round 0
    "clients": list,  # client ids trained this round
    "seconds": dict,  # phase -> seconds (PHASES)
}
# Keys of every row after round 0.
TRAINED_KEYS: dict[str, type | tuple[type, ...]] = {
    "train_loss": (int, float),  # mean local loss of the round's clients
    "bytes_up_per_client": (int, float),
    "bytes_down_per_client": int,
    "peak_memory_bytes": int,  # CUDA: max allocated; CPU: the process's max RSS
}
# The generation evaluation (``evaluation.METRICS``, means in percent over the run's fixed
# held-out set), on the rounds where it ran.
QUALITY_KEYS: dict[str, type | tuple[type, ...]] = {
    "rouge_l_paper": (int, float),  # Rouge-L F as the Ferret reference code computes it
    "rouge_l_google": (int, float),  # Rouge-L F from Google's rouge-score
    "exact_match": (int, float),  # Super-NaturalInstructions' normalised exact match
    "eval_examples": int,  # how many held-out examples they average over
}
# Keys a row may carry.
OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    **QUALITY_KEYS,
    "byzantine": list,  # client ids that attacked this round (attacks.py experiments)
    "refusals": list,  # uploads the server refused: {"client_id", "reason", "detail"}
    "views": dict,  # other models the server evaluated (FedPT): name -> {"eval_loss", QUALITY_KEYS...}
    "distillation": dict,  # FedPT: the server's distillation (kl_before, kl_after, kept, tokens, seconds)
}


def path(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_FILE)


def check_row(row: dict, where: str = "row") -> dict:
    """``row`` after checking its keys and types; raise ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not a JSON object")
    required = dict(ROW_KEYS, **(TRAINED_KEYS if row.get("round") else {}))
    for key, typ in {**required, **OPTIONAL_KEYS}.items():
        if key not in row:
            if key in required:
                raise ValueError(f"{where} lacks {key!r}")
            continue
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, typ):
            raise ValueError(f"{where}: {key!r} is {value!r}, expected {typ}")
    unknown = set(row["seconds"]) - set(PHASES)
    if unknown:
        raise ValueError(f"{where}: unknown phases {sorted(unknown)} in 'seconds' (known: {PHASES})")
    return row


def initial_row(algorithm: str, eval_loss: float, quality: dict | None, seconds: float) -> dict:
    """Round 0: the model before training. quality: QUALITY_KEYS values, or None / {} when not evaluated."""
    row = {"round": 0, "algorithm": algorithm, "eval_loss": eval_loss, "bytes_up": 0, "bytes_down": 0,
           "cumulative_bytes": 0, "clients": [], "seconds": {"evaluation": seconds}, **_quality(quality)}
    return check_row(row)


def _quality(quality: dict | None) -> dict:
    unknown = set(quality or {}) - set(QUALITY_KEYS)
    if unknown:
        raise ValueError(f"unknown quality fields {sorted(unknown)} (known: {sorted(QUALITY_KEYS)})")
    return dict(quality or {})


def round_row(round_index: int, algorithm: str, *, clients: list[int], train_losses: list[float], eval_loss: float,
              upload_sizes: list[int], downlink_size: int, previous: dict, seconds: dict[str, float],
              peak_memory_bytes: int, quality: dict | None = None) -> dict:
    """A trained round: byte counts from the message sizes, cumulative from ``previous`` (the row before)."""
    up, down = sum(upload_sizes), downlink_size * len(upload_sizes)
    row = {"round": round_index, "algorithm": algorithm, "clients": list(clients),
           "train_loss": sum(train_losses) / len(train_losses), "eval_loss": eval_loss, "bytes_up": up,
           "bytes_down": down, "bytes_up_per_client": up / len(upload_sizes), "bytes_down_per_client": downlink_size,
           "cumulative_bytes": previous["cumulative_bytes"] + up + down, "seconds": dict(seconds),
           "peak_memory_bytes": peak_memory_bytes, **_quality(quality)}
    return check_row(row)


def finite(row: dict) -> bool:
    return all(math.isfinite(row[k]) for k in ("eval_loss", "train_loss") if k in row)


def read(run_dir: str, upto_round: int | None = None) -> list[dict]:
    """The checked rows of ``run_dir``'s metrics file (those up to ``upto_round`` if given)."""
    p = path(run_dir)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} not found: is {run_dir} a ferret-fl output directory?")
    with open(p) as f:
        rows = [check_row(json.loads(line), f"{p} line {i + 1}") for i, line in enumerate(f) if line.strip()]
    return [r for r in rows if upto_round is None or r["round"] <= upto_round]


def write(run_dir: str, rows: list[dict]) -> None:
    """Replace ``run_dir``'s metrics file with ``rows`` (a temporary file renamed into place)."""
    p = path(run_dir)
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, p)
