"""The embedded simulation engine: one process, one model, clients trained in turn.

It drives an algorithm's two roles (``algorithms.ServerRole`` / ``ClientRole``) exactly
as a deployment would, over one shared model: each round the server announces the round,
a fraction of the clients (seeded by the run seed and the round, so a resumed run samples
the same clients) each train from the global weights and upload bytes, the server
aggregates the uploads into the downlink bytes and applies them as every client replays
them. Every number in the per-round metrics (``metrics.py``) is measured: bytes are the
lengths of the encoded messages, seconds are wall-clock per phase. A checkpoint after
every round makes ``--resume`` continue the same run to the same final weights, and a
guard stops a run whose held-out loss explodes (``divergence_factor``).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import attacks, checkpoint, evaluation, metrics
from .algorithms import build_client, build_server, prepare_model
from .config import RunConfig, as_dict, inert_settings
from .data import FederatedDataset, collate, load_data, named_rng, tokenize_examples
from .models import load_causal_lm


def load_dataset(cfg: RunConfig) -> FederatedDataset:
    """The run's data (``cfg.data``), drawn with ``cfg.data_seed``, never the training seed."""
    return load_data(cfg.data, seed=cfg.data_seed, num_clients=cfg.num_clients, dirichlet_alpha=cfg.dirichlet_alpha,
                     min_client_samples=cfg.min_client_samples)


def sample_clients(cfg: RunConfig, round_index: int, num_clients: int) -> list[int]:
    """The clients of a round: a fraction (<= 1) or a count (> 1) of N, at least one."""
    if cfg.clients_per_round <= 1:
        m = max(1, round(cfg.clients_per_round * num_clients))
    else:
        m = min(num_clients, int(cfg.clients_per_round))
    rng = named_rng(cfg.seed, f"clients/{round_index}")
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def usable_examples(items: list) -> list:
    """The tokenized examples a client trains on: those with a supervised token left at max_length."""
    return [it for it in items if it.num_target_tokens > 0]


def client_steps(cfg: RunConfig, items: list, round_index: int, client: int, pad_id: int,
                 role=None) -> list[list[dict]]:
    """The client's optimizer steps, each a list of micro-batches, walking seeded shuffles of
    its data (an epoch boundary starts a new shuffle): local_steps x grad_accum x batch_size,
    or the shape ``role.batch_shape`` fits to the client (a ``ClientRole``; FedPipe's)."""
    usable = usable_examples(items)
    if not usable:
        raise ValueError(f"client {client} has no example with a supervised token at max_length {cfg.max_length}")
    local_steps, grad_accum, batch_size = (role.batch_shape(client, usable) if role is not None else
                                           (cfg.local_steps, cfg.grad_accum, cfg.batch_size))
    rng = named_rng(cfg.seed, f"batches/{round_index}/{client}")
    order: list[int] = []
    needed = local_steps * grad_accum * batch_size
    while len(order) < needed:
        order.extend(int(i) for i in rng.permutation(len(usable)))
    steps, pos = [], 0
    for _ in range(local_steps):
        micro = []
        for _ in range(grad_accum):
            micro.append(collate([usable[i] for i in order[pos:pos + batch_size]], pad_id))
            pos += batch_size
        steps.append(micro)
    return steps


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


EVAL_DIR = "eval"


def eval_result_path(run_dir: str, round_index: int, view: str = "") -> str:
    """Where a run keeps the per-example scores of the generation evaluation after a round
    (of the server's evaluation ``view`` when named)."""
    return os.path.join(run_dir, EVAL_DIR, f"round-{round_index:06d}{'-' + view if view else ''}.json")


@dataclass
class Evaluator:
    """The run's two fixed held-out sets (``evaluation.sized_eval_set``, seed
    ``evaluation.EVAL_SET_SEED``): ``loss_set`` for the held-out loss every round,
    ``generation_set`` for Rouge-L and exact match."""

    cfg: RunConfig
    dataset: FederatedDataset
    tokenizer: Any

    def __post_init__(self):
        self.generation_set = evaluation.sized_eval_set(self.dataset, self.cfg.eval_samples)
        self.loss_set = evaluation.sized_eval_set(self.dataset, self.cfg.eval_loss_samples)
        loss_items = tokenize_examples(self.loss_set.examples, self.tokenizer, self.cfg.max_length)
        pad = self.tokenizer.pad_token_id
        bs = self.cfg.eval_batch_size
        self.loss_batches = [collate(loss_items[i:i + bs], pad) for i in range(0, len(loss_items), bs)]

    def loss(self, model) -> float:
        return evaluation.mean_loss(model, self.loss_batches)

    def generate(self, model, progress: bool = False) -> evaluation.EvalResult:
        return evaluation.evaluate_model(model, self.tokenizer, self.generation_set, self.cfg.max_new_tokens,
                                         self.cfg.eval_batch_size, self.cfg.max_length, progress)


def quality(result: evaluation.EvalResult | None) -> dict[str, float]:
    """The metrics-row fields of a generation evaluation: each metric's mean and the example count."""
    if result is None:
        return {}
    return {**{m: result.mean(m) for m in evaluation.METRICS}, "eval_examples": len(result.tasks)}


def describe(row: dict) -> str:
    return (f"eval loss {row['eval_loss']:.4f}" + "".join(
        f", {evaluation.METRIC_LABELS[m]} {row[m]:.2f}" for m in evaluation.METRICS if m in row))


# Settings a resumed run may change: how long it runs, how it evaluates, where it writes.
RESUMABLE_CHANGES = {"rounds", "eval_every", "eval_samples", "eval_loss_samples", "max_new_tokens", "eval_batch_size",
                     "output_dir", "device", "backend", "divergence_factor"}


def _check_resumable(ckpt_dir: str, cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint under settings that would make it a different run."""
    saved = checkpoint.read_state(ckpt_dir).get("config", {})
    ignored = RESUMABLE_CHANGES | inert_settings(cfg.algorithm)
    changed = sorted(k for k, v in as_dict(cfg).items() if k not in ignored and saved.get(k, v) != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"cannot resume {ckpt_dir}: settings differ from the checkpointed run ({detail}); "
                         "use the same settings or a new --output-dir")



def _save_result(run_dir: str, round_index: int, result: evaluation.EvalResult, view: str = "") -> None:
    path = eval_result_path(run_dir, round_index, view)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    result.save(tmp)
    os.replace(tmp, path)


def evaluate_round(cfg: RunConfig, evaluator: Evaluator, model, round_index: int,
                   progress: bool = False) -> tuple[float, evaluation.EvalResult | None]:
    """The held-out loss after ``round_index`` (0: before training), and the generation
    evaluation on the rounds it runs (before the first, after the last, every
    ``eval_every``; saved in the run directory)."""
    loss = evaluator.loss(model)
    if not math.isfinite(loss) or not generation_round(cfg, round_index):
        return loss, None
    result = evaluator.generate(model, progress)
    _save_result(cfg.output_dir, round_index, result)
    return loss, result


def generation_round(cfg: RunConfig, round_index: int) -> bool:
    """Whether the generation evaluation runs after ``round_index``."""
    return round_index in (0, cfg.rounds) or (cfg.eval_every > 0 and round_index % cfg.eval_every == 0)


def evaluate_views(cfg: RunConfig, evaluator: Evaluator, server, model, round_index: int,
                   progress: bool = False) -> dict[str, dict]:
    """Held-out loss, and on generation rounds the generation metrics, of the other models a
    server role offers for evaluation (``evaluation_views``: FedPT's large model and proxies),
    by view name; {} for roles that offer none."""
    views = getattr(server, "evaluation_views", None)
    out = {}
    for name, view in (views(model, round_index) if views else {}).items():
        loss = evaluator.loss(view)
        result = None
        if math.isfinite(loss) and generation_round(cfg, round_index):
            result = evaluator.generate(view, progress)
            _save_result(cfg.output_dir, round_index, result, name)
        out[name] = {"eval_loss": loss, **quality(result)}
    return out


class DivergedError(RuntimeError):
    """The held-out loss exploded or stopped being finite; the message names the knobs to turn."""


LOWER = "lower it"
# The settings to turn when a run of each algorithm diverges, and which way.
KNOBS = {
    "ferret": (("server_lr", "lower it: the paper's value (10 NI, 3 Dolly) goes with scale=paper"),
               ("scale", "with scale=unbiased use a third of the paper's server_lr"),
               ("lr", LOWER), ("clip_norm", "set it to bound each block of the server update")),
    "fedavg": (("fedavg_server_lr", LOWER), ("lr", LOWER), ("max_grad_norm", "set it to clip local gradients")),
    "fedit": (("fedavg_server_lr", LOWER), ("lr", LOWER), ("max_grad_norm", "set it to clip local gradients")),
    "fedkseed": (("kseed_lr", LOWER), ("kseed_eps", LOWER)),
    "fedpipe": (("fedavg_server_lr", LOWER), ("lr", LOWER), ("max_grad_norm", "set it to clip local gradients")),
    "fedpt": (("fedpt_distill_lr", LOWER), ("server_lr", "lower it (fedpt_inner=ferret)"),
              ("fedavg_server_lr", "lower it (fedpt_inner=fedavg)"), ("lr", LOWER)),
}


def check_divergence(cfg: RunConfig, previous: list[dict], row: dict) -> None:
    """Raise DivergedError if ``row``'s losses are not finite, or its held-out loss exceeds
    ``divergence_factor`` times the best of ``previous`` (round 0 included)."""
    best = min(previous, key=lambda r: r["eval_loss"])
    loss = row["eval_loss"]
    if metrics.finite(row) and not (cfg.divergence_factor and loss > cfg.divergence_factor * best["eval_loss"]):
        return
    what = (f"the loss is not finite (train {row['train_loss']}, held-out {loss})" if not metrics.finite(row) else
            f"the held-out loss {loss:.4f} is {loss / best['eval_loss']:.1f}x the best so far "
            f"({best['eval_loss']:.4f} at round {best['round']}; divergence_factor={cfg.divergence_factor})")
    knobs = "; ".join(f"{k}={getattr(cfg, k)!r} ({advice})" for k, advice in KNOBS[cfg.algorithm])
    raise DivergedError(f"round {row['round']}: {what}: training diverged, stopped. Settings to turn: {knobs}. "
                        f"The checkpoint holds round {row['round'] - 1}; divergence_factor=0 never stops.")


def run(cfg: RunConfig, resume: bool = False, progress: bool = True,
        stop_after_round: int | None = None, log: Callable[[str], None] = print,
        preloaded: tuple | None = None, baseline: dict | None = None) -> list[dict]:
    """Run (or resume) a federated fine-tuning run; returns the metrics rows.

    preloaded: (model, tokenizer) already holding cfg.model's initial weights (the demo
    loads once for several algorithms). baseline: a round-0 row measured on the same
    model, data and evaluation settings, reused instead of evaluating again.
    Raises DivergedError (after writing the round's metrics, keeping the previous
    checkpoint) when the held-out loss explodes.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    dataset = load_dataset(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoint")
    model, tokenizer = preloaded or load_causal_lm(cfg.model, cfg.dtype, cfg.device, seed=cfg.seed)
    model = prepare_model(cfg, model)
    server, client = build_server(cfg, model), build_client(cfg, model)
    evaluator = Evaluator(cfg, dataset, tokenizer)
    tokenized: dict[int, list] = {}

    start_round, rows = 1, []
    if resume and checkpoint.exists(ckpt_dir):
        _check_resumable(ckpt_dir, cfg)
        tensors, state = checkpoint.load(ckpt_dir, model)
        server.load_state_dict(tensors)
        start_round = int(state["round"]) + 1
        if server.round != start_round:
            raise ValueError(f"{ckpt_dir} is inconsistent: it holds round {state['round']} but its server state is at "
                             f"round {server.round}")
        rows = metrics.read(cfg.output_dir, state["round"])
        log(f"resuming {cfg.algorithm} after round {state['round']} from {ckpt_dir}")
    elif resume:
        log(f"no checkpoint in {ckpt_dir}: starting from round 1")

    if start_round == 1:
        if baseline is not None:
            row = {**baseline, "algorithm": cfg.algorithm}
        else:
            t = time.perf_counter()
            loss, result = evaluate_round(cfg, evaluator, model, 0, progress)
            views = evaluate_views(cfg, evaluator, server, model, 0, progress)
            row = metrics.initial_row(cfg.algorithm, loss, quality(result), time.perf_counter() - t)
            if views:
                row["views"] = views
        rows = [row]
        metrics.write(cfg.output_dir, rows)
        log(f"round 0: {describe(row)}")

    for r in range(start_round, cfg.rounds + 1):
        clients = sample_clients(cfg, r, dataset.num_clients)
        seconds = dict.fromkeys(metrics.PHASES, 0.0)
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        announcement = server.announce(r)
        byzantine = attacks.attackers(cfg.seed, r, clients, cfg.byzantine_fraction)
        messages = []
        bar = tqdm(clients, desc=f"round {r}/{cfg.rounds}", disable=not progress, leave=False)
        for c in bar:
            if c not in tokenized:
                tokenized[c] = tokenize_examples(dataset.clients[c].examples, tokenizer, cfg.max_length)
            steps = client_steps(cfg, tokenized[c], r, c, tokenizer.pad_token_id, client)
            msg = client.train(model, steps, announcement, client_id=c,
                               num_samples=len(usable_examples(tokenized[c])))
            if c in byzantine:
                msg.payload = attacks.corrupt(msg.payload, client.plan, cfg.attack, round_index=r, seed=cfg.seed,
                                              client_id=c, dtype=cfg.coefficient_dtype)
            messages.append(msg)
            for phase in ("local", "compress"):
                seconds[phase] += msg.seconds.get(phase, 0.0)
            bar.set_postfix(client=c, loss=f"{msg.train_loss:.4f}")
        t = time.perf_counter()
        # Refused uploads are dropped and recorded, as a deployment's server must; the
        # round fails only when nothing is left.
        downlink = server.aggregate(r, [m.payload for m in messages], client_ids=clients, skip_refused=True)
        seconds["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        server.apply_(model, downlink, r)
        seconds["apply"] = time.perf_counter() - t
        t = time.perf_counter()
        loss, result = evaluate_round(cfg, evaluator, model, r, progress)
        views = evaluate_views(cfg, evaluator, server, model, r, progress)
        seconds["evaluation"] = time.perf_counter() - t
        row = metrics.round_row(r, cfg.algorithm, clients=clients, train_losses=[m.train_loss for m in messages],
                                eval_loss=loss, upload_sizes=[len(m.payload) for m in messages],
                                downlink_size=len(downlink), previous=rows[-1], seconds=seconds,
                                peak_memory_bytes=peak_memory_bytes(cfg.device), quality=quality(result))
        if byzantine:
            row["byzantine"] = sorted(byzantine)
        if views:
            row["views"] = views
        if getattr(server, "last_report", None):
            row["distillation"] = server.last_report
        if server.refusals:
            row["refusals"] = [{k: v for k, v in x.items() if k != "round"} for x in server.refusals]
        rows.append(row)
        # Metrics first: a crash before the checkpoint lands redoes this round on resume.
        metrics.write(cfg.output_dir, rows)
        log(f"round {r}: train loss {row['train_loss']:.4f}, {describe(row)}"
            + (f", refused {len(row['refusals'])} ({', '.join(x['reason'] for x in row['refusals'])})"
               if "refusals" in row else "")
            + f", up {row['bytes_up']:,} B, down {row['bytes_down']:,} B, local {seconds['local']:.1f}s, "
            f"compress {seconds['compress']:.2f}s, aggregate {seconds['aggregate']:.2f}s, apply {seconds['apply']:.2f}s")
        check_divergence(cfg, rows[:-1], row)
        checkpoint.save(ckpt_dir, model, server.state_dict(), {"round": r, "config": as_dict(cfg)})
        if stop_after_round is not None and r >= stop_after_round:
            break
    return rows
