"""One Ferret client round and server apply on a real model, timed phase by phase.

Loads a model (default: the embedded SmolLM2-135M-Instruct; ``llama-3b-shape`` and
``llama-7b-shape`` are the paper's shapes with random weights), takes SGD steps on
instruction data from the shipped synthetic benchmark, then times with the library API:
compress (snapshot diff + one project_blocks launch), encode, decode + aggregate of
``--clients`` updates sharing the round seed, apply (one reconstruct_blocks_ launch),
and a client replay of the GlobalUpdate, which must give the server's weights bit for
bit; then a second client round (``*_warm``: no compilation or first-launch cost).
Prints the message sizes too.

On CUDA each phase is timed between device synchronisations and its peak memory
(``torch.cuda.max_memory_allocated``) recorded. ``fedavg_local`` is the same local
steps run first without a Ferret round (no snapshot): the FedAvg client's peak, the
reference for the Ferret client's. The replica for the replay is a copy on the same
device unless ``--replay-device cpu``.

    python benchmarks/bench_round.py [--model smollm2-135m] [--budget 7800] [--distribution gaussian]
    python benchmarks/bench_round.py --model llama-3b-shape --device cuda --dtype bfloat16 \\
        --steps 10 --grad-accum 4 --batch-size 1 --max-length 1024 --clients 37
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

import ferret_kernels as fk
from ferret_fl.data import collate, load_synthetic, tokenize_examples
from ferret_fl.models import EMBEDDED_DEFAULT, load_causal_lm


class Phases:
    """Wall seconds and (CUDA) peak bytes per named phase, synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._name = None

    def start(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._name, self._t = name, time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes[self._name] = torch.cuda.max_memory_allocated()
        self.seconds[self._name] = time.perf_counter() - self._t


def local_steps(model, batches, steps: int, grad_accum: int, lr: float) -> float:
    """``steps`` SGD steps of ``grad_accum`` micro-batches each; returns the last loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.zeros(())
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for a in range(grad_accum):
            batch = batches[(s * grad_accum + a) % len(batches)]
            loss = model(**batch).loss / grad_accum
            loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()) * grad_accum


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget", type=int, default=7800)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clients", type=int, default=1, help="updates sharing the round seed the server aggregates")
    p.add_argument("--distribution", default="gaussian", choices=fk.DISTRIBUTIONS)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-fedavg", dest="fedavg", action="store_false", help="skip the FedAvg-client reference")
    p.add_argument("--replay-device", default=None, help="device of the replaying client (default: --device)")
    p.add_argument("--snapshot-device", default=None, help="where the client keeps w_start (default: with the model; "
                                                            "cpu keeps accelerator memory at the FedAvg client's)")
    p.add_argument("--json")
    args = p.parse_args()

    device = torch.device(args.device)
    phases = Phases(device)
    model, tokenizer = load_causal_lm(args.model, args.dtype, args.device)
    plan = fk.FerretPlan.from_model(model, args.budget, distribution=args.distribution, backend=args.backend)
    examples = load_synthetic().clients[0].examples
    items = [it for it in tokenize_examples(examples, tokenizer, args.max_length) if it.num_target_tokens > 0]
    if len(items) < args.batch_size:
        raise SystemExit(f"only {len(items)} examples keep a target token at --max-length {args.max_length}: raise it")
    batches = [{k: v.to(device) for k, v in collate(items[i:i + args.batch_size], tokenizer.pad_token_id).items()}
               for i in range(0, len(items) - args.batch_size + 1, args.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)

    if args.fedavg:
        phases.start("fedavg_local")
        local_steps(model, batches, args.steps, args.grad_accum, args.lr)
        phases.stop()

    seed = fk.round_seed(7, 1)
    phases.start("snapshot")
    with plan.client_round(model, round=1, seed=seed, num_samples=len(items),
                           snapshot_device=args.snapshot_device) as cr:
        phases.stop()
        phases.start("local")
        train_loss = local_steps(model, batches, args.steps, args.grad_accum, args.lr)
        phases.stop()
        phases.start("compress")
    phases.stop()
    phases.start("encode")
    up = fk.encode_client_update(cr.update)
    phases.stop()

    replay_device = args.replay_device or args.device
    replica = copy.deepcopy(model).to(replay_device)
    phases.start("aggregate")
    agg = fk.Aggregator(plan, round=1, base_seed=7, server_lr=1.0)
    first = fk.decode_client_update(up, plan, round=1)
    agg.add(first, client_id=0)
    for i in range(1, args.clients):
        agg.add(dataclasses.replace(first, coefficients=first.coefficients * (1 + 0.01 * i)), client_id=i)
    update = agg.aggregate(device=device)
    phases.stop()
    phases.start("apply")
    update.apply_(model)
    phases.stop()
    down = fk.encode_global_update(update)
    replay_plan = fk.FerretPlan.from_model(replica, args.budget, distribution=args.distribution)
    phases.start("replay")
    fk.decode_global_update(down, replay_plan, round=1).apply_(replica)
    phases.stop()
    # a second client round in the same process: compile and first-launch costs gone
    phases.start("snapshot_warm")
    with plan.client_round(model, round=2, seed=fk.round_seed(7, 2), num_samples=len(items),
                           snapshot_device=args.snapshot_device):
        phases.stop()
        local_steps(model, batches, 1, 1, args.lr)
        phases.start("compress_warm")
    phases.stop()
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(model.state_dict().values(),
                                                              replica.state_dict().values(), strict=True))
    work = sum(s * c for s, c in zip(plan.block_sizes, cr.update.counts, strict=True))
    result = dict(model=args.model, device=str(device),
                  device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  dtype=args.dtype, parameters=plan.numel, blocks=plan.num_blocks, budget=args.budget,
                  distribution=args.distribution, backend=fk.backends.resolve(args.backend, device),
                  replay_device=replay_device, snapshot_device=args.snapshot_device, threads=torch.get_num_threads(),
                  clients=args.clients,
                  steps=args.steps, grad_accum=args.grad_accum, batch_size=args.batch_size,
                  mean_tokens_per_batch=tokens, train_loss=train_loss, bytes_up=len(up), bytes_down=len(down),
                  element_bases=work, seconds=phases.seconds, peak_bytes=phases.peak_bytes,
                  replay_bitwise_equal=same)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not same:
        raise SystemExit("the client replay differs from the server's weights")


if __name__ == "__main__":
    main()
