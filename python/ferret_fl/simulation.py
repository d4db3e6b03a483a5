"""The embedded simulation engine: one process, one model, clients trained in turn.

Each round samples a fraction of the clients (seeded by the run seed and the round, so
a resumed run samples the same clients), trains each from the global weights, aggregates
their messages and applies the result as every client would replay it. Every number in
the per-round metrics is measured: bytes are the lengths of the encoded messages,
seconds are wall-clock per phase. A checkpoint after every round makes ``--resume``
continue the same run to the same final weights.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint, evaluation
from .algorithms import build_algorithm
from .config import RunConfig, as_dict
from .data import FederatedDataset, collate, named_rng, tokenize_examples
from .models import load_causal_lm

METRICS_FILE = "metrics.jsonl"


def load_dataset(cfg: RunConfig) -> FederatedDataset:
    from . import data

    if cfg.data == "synthetic":
        return data.load_synthetic(seed=cfg.seed)
    kind, _, location = cfg.data.partition(":")
    if kind == "dolly":
        return data.load_dolly(location or data.DOLLY_HUB_ID, num_clients=cfg.num_clients,
                               alpha=cfg.dirichlet_alpha, min_samples_per_client=cfg.min_client_samples,
                               seed=cfg.seed)
    if kind == "ni":
        if not location:
            raise ValueError("data 'ni:<directory>' needs the Natural Instructions directory")
        return data.load_natural_instructions(location, seed=cfg.seed)
    raise ValueError(f"data must be 'synthetic', 'dolly[:<jsonl>]' or 'ni:<dir>'; got {cfg.data!r}")


def sample_clients(cfg: RunConfig, round_index: int, num_clients: int) -> list[int]:
    """The clients of a round: a fraction (<= 1) or a count (> 1) of N, at least one."""
    if cfg.clients_per_round <= 1:
        m = max(1, round(cfg.clients_per_round * num_clients))
    else:
        m = min(num_clients, int(cfg.clients_per_round))
    rng = named_rng(cfg.seed, f"clients/{round_index}")
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def client_steps(cfg: RunConfig, items: list, round_index: int, client: int, pad_id: int) -> list[list[dict]]:
    """local_steps optimizer steps, each of grad_accum micro-batches of batch_size examples,
    walking seeded shuffles of the client's data (an epoch boundary starts a new shuffle)."""
    usable = [it for it in items if it.num_target_tokens > 0]
    if not usable:
        raise ValueError(f"client {client} has no example with a supervised token at max_length {cfg.max_length}")
    rng = named_rng(cfg.seed, f"batches/{round_index}/{client}")
    order: list[int] = []
    needed = cfg.local_steps * cfg.grad_accum * cfg.batch_size
    while len(order) < needed:
        order.extend(int(i) for i in rng.permutation(len(usable)))
    steps, pos = [], 0
    for _ in range(cfg.local_steps):
        micro = []
        for _ in range(cfg.grad_accum):
            micro.append(collate([usable[i] for i in order[pos:pos + cfg.batch_size]], pad_id))
            pos += cfg.batch_size
        steps.append(micro)
    return steps


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Evaluator:
    cfg: RunConfig
    dataset: FederatedDataset
    tokenizer: Any

    def __post_init__(self):
        examples = list(self.dataset.eval_examples)
        self.rouge_examples = examples[: self.cfg.eval_samples]
        loss_items = tokenize_examples(examples[: self.cfg.eval_loss_samples], self.tokenizer, self.cfg.max_length)
        pad = self.tokenizer.pad_token_id
        bs = self.cfg.eval_batch_size
        self.loss_batches = [collate(loss_items[i:i + bs], pad) for i in range(0, len(loss_items), bs)]

    def loss(self, model) -> float:
        return evaluation.mean_loss(model, self.loss_batches)

    def rouge(self, model) -> tuple[float, list[str]]:
        predictions = evaluation.generate_greedy(model, self.tokenizer, self.rouge_examples, self.cfg.max_new_tokens,
                                                 self.cfg.eval_batch_size, self.cfg.max_length)
        return evaluation.rouge_l(predictions, [ex.output for ex in self.rouge_examples]), predictions


# Settings a resumed run may change: how long it runs, how it evaluates, where it writes.
RESUMABLE_CHANGES = {"rounds", "eval_every", "eval_samples", "eval_loss_samples", "max_new_tokens", "eval_batch_size",
                     "output_dir", "device", "backend"}


def _check_resumable(ckpt_dir: str, cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint under settings that would make it a different run."""
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        saved = json.load(f).get("config", {})
    changed = sorted(k for k, v in as_dict(cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k, v) != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"cannot resume {ckpt_dir}: settings differ from the checkpointed run ({detail}); "
                         "use the same settings or a new --output-dir")


def _read_metrics(path: str, upto_round: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["round"] <= upto_round]


def _write_metrics(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(cfg: RunConfig, resume: bool = False, progress: bool = True,
        stop_after_round: int | None = None, log: Callable[[str], None] = print,
        preloaded: tuple | None = None, baseline: dict | None = None) -> list[dict]:
    """Run (or resume) a federated fine-tuning run; returns the metrics rows.

    preloaded: (model, tokenizer) already holding cfg.model's initial weights (the demo
    loads once for several algorithms). baseline: a round-0 row measured on the same
    model, data and evaluation settings, reused instead of evaluating again.
    """
    from tqdm.auto import tqdm

    os.makedirs(cfg.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoint")
    metrics_path = os.path.join(cfg.output_dir, METRICS_FILE)
    dataset = load_dataset(cfg)
    model, tokenizer = preloaded or load_causal_lm(cfg.model, cfg.dtype, cfg.device, seed=cfg.seed)
    algo = build_algorithm(cfg, model)
    model = algo.prepare(model)
    evaluator = Evaluator(cfg, dataset, tokenizer)
    tokenized: dict[int, list] = {}

    start_round, rows = 1, []
    if resume and checkpoint.exists(ckpt_dir):
        _check_resumable(ckpt_dir, cfg)
        tensors, state = checkpoint.load(ckpt_dir, model)
        algo.load_state_tensors(tensors)
        start_round = int(state["round"]) + 1
        rows = _read_metrics(metrics_path, state["round"])
        log(f"resuming {cfg.algorithm} after round {state['round']} from {ckpt_dir}")
    elif resume:
        log(f"no checkpoint in {ckpt_dir}: starting from round 1")

    if start_round == 1:
        if baseline is not None:
            row = {**baseline, "algorithm": cfg.algorithm}
        else:
            t = time.perf_counter()
            row = {"round": 0, "algorithm": cfg.algorithm, "eval_loss": evaluator.loss(model)}
            row["rouge_l"], _ = evaluator.rouge(model)
            row["seconds"] = {"evaluation": time.perf_counter() - t}
            row.update(bytes_up=0, bytes_down=0, cumulative_bytes=0, clients=[])
        rows = [row]
        _write_metrics(metrics_path, rows)
        log(f"round 0: eval loss {row['eval_loss']:.4f}" + (f", Rouge-L {row['rouge_l']:.2f}" if "rouge_l" in row else ""))

    for r in range(start_round, cfg.rounds + 1):
        clients = sample_clients(cfg, r, dataset.num_clients)
        seconds = {"local": 0.0, "compress": 0.0, "aggregate": 0.0, "apply": 0.0, "evaluation": 0.0}
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        messages = []
        bar = tqdm(clients, desc=f"round {r}/{cfg.rounds}", disable=not progress, leave=False)
        for c in bar:
            if c not in tokenized:
                tokenized[c] = tokenize_examples(dataset.clients[c].examples, tokenizer, cfg.max_length)
            steps = client_steps(cfg, tokenized[c], r, c, tokenizer.pad_token_id)
            msg = algo.client_update(model, steps, r, c)
            messages.append(msg)
            for phase in ("local", "compress"):
                seconds[phase] += msg.seconds.get(phase, 0.0)
            bar.set_postfix(client=c, loss=f"{msg.train_loss:.4f}")
        t = time.perf_counter()
        payload = algo.aggregate(messages, r)
        seconds["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        algo.apply_(model, payload, r)
        seconds["apply"] = time.perf_counter() - t
        t = time.perf_counter()
        row = {"round": r, "algorithm": cfg.algorithm, "clients": clients,
               "train_loss": sum(m.train_loss for m in messages) / len(messages),
               "eval_loss": evaluator.loss(model)}
        if r == cfg.rounds or (cfg.eval_every > 0 and r % cfg.eval_every == 0):
            row["rouge_l"], _ = evaluator.rouge(model)
        seconds["evaluation"] = time.perf_counter() - t
        up = sum(len(m.payload) for m in messages)
        down = len(payload) * len(messages)
        row.update(bytes_up=up, bytes_down=down, bytes_up_per_client=up / len(messages),
                   bytes_down_per_client=len(payload),
                   cumulative_bytes=rows[-1]["cumulative_bytes"] + up + down, seconds=seconds,
                   peak_memory_bytes=peak_memory_bytes(cfg.device))
        if not all(math.isfinite(v) for v in (row["train_loss"], row["eval_loss"])):
            raise FloatingPointError(f"round {r}: the loss is not finite; lower lr or server_lr")
        rows.append(row)
        # Metrics first: a crash before the checkpoint lands redoes this round on resume.
        _write_metrics(metrics_path, rows)
        checkpoint.save(ckpt_dir, model, algo.state_tensors(), {"round": r, "config": as_dict(cfg)})
        log(f"round {r}: train loss {row['train_loss']:.4f}, eval loss {row['eval_loss']:.4f}"
            + (f", Rouge-L {row['rouge_l']:.2f}" if "rouge_l" in row else "")
            + f", up {up:,} B, down {down:,} B, local {seconds['local']:.1f}s, compress {seconds['compress']:.2f}s,"
            f" aggregate {seconds['aggregate']:.2f}s, apply {seconds['apply']:.2f}s")
        if stop_after_round is not None and r >= stop_after_round:
            break
    return rows
