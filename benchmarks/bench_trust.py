"""Trust-boundary figures on a real model: honest influence bounds, digest cost, default-on bits.

On SmolLM2-135M-Instruct (embedded) and the shipped synthetic benchmark, for each local
training setting (the demo's, the paper configs', AdamW):

- the worst-case influence bound of an honest client's update, |server_lr| x
  BASIS_BOUND x max_l sum_k |gamma_l,k| (what ``Aggregator(max_step=...)`` compares
  against), next to the largest weight change the applied update really makes;
- that the default trust options (max_step, sample_cap, duplicate checks) change no bit
  of the round: the server weights equal those of an Aggregator with them off;
- the cost of the replay guard's digest (``plan.digest``) next to the round's phases.

    python benchmarks/bench_trust.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import ferret_kernels as fk
from ferret_fl.data import collate, load_synthetic, tokenize_examples
from ferret_fl.models import EMBEDDED_DEFAULT, load_causal_lm
from ferret_kernels.messages import BASIS_BOUND
from ferret_kernels.server import DEFAULT_MAX_STEP

# (name, optimizer, local lr, steps, examples per step, server_lr): the demo's settings
# (ferret_fl.cli DEMO), the paper configs' (configs/*.yaml, SGD 1e-4, 10 steps,
# server_lr 10) and the same with AdamW, whose per-step moves are ~lr per weight.
SETTINGS = [
    ("demo", "sgd", 1e-3, 3, 2, 1.0),
    ("paper-sgd", "sgd", 1e-4, 10, 1, 10.0),
    ("paper-adamw", "adamw", 1e-4, 10, 1, 10.0),
]
CLIENTS = 2


def train(model, optimizer, lr, steps, batches):
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)(model.parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--budget", type=int, default=7800)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model)
    plan = fk.FerretPlan.from_model(model, args.budget)
    bench = load_synthetic()
    results = {"model": args.model, "parameters": plan.numel, "budget": args.budget,
               "default_max_step": DEFAULT_MAX_STEP, "settings": []}
    bound = BASIS_BOUND[plan.distribution]
    for name, optimizer, lr, steps, per_step, server_lr in SETTINGS:
        print(f"[{name}] training {CLIENTS} clients", flush=True)
        start = copy.deepcopy(model)
        agg = fk.Aggregator(plan, round=1, base_seed=7, server_lr=server_lr)
        bare = fk.Aggregator(plan, round=1, base_seed=7, server_lr=server_lr, max_step=None, sample_cap=None,
                             influence_cap=None)
        influences, seconds = [], {"local": 0.0, "compress": 0.0}
        for c in range(CLIENTS):
            client = copy.deepcopy(start)
            items = tokenize_examples(bench.clients[c].examples, tokenizer, 256)
            batches = [collate(items[i:i + per_step], tokenizer.pad_token_id)
                       for i in range(0, per_step * steps, per_step) if items[i:i + per_step]]
            t = time.perf_counter()
            cr = plan.client_round(client, round=1, seed=agg.seed, num_samples=len(items)).begin()
            train(client, optimizer, lr, steps, batches)
            seconds["local"] += time.perf_counter() - t
            t = time.perf_counter()
            update = cr.compress()
            seconds["compress"] += time.perf_counter() - t
            influences.append(server_lr * bound * float(update.block_l1(plan).max()))
            agg.add(update, client_id=c)
            bare.add(update)
        server, reference = copy.deepcopy(start), copy.deepcopy(start)
        t = time.perf_counter()
        g = agg.apply_(server)
        seconds["apply (incl. digest)"] = time.perf_counter() - t
        bare.aggregate().apply_(reference)
        same = all(torch.equal(a, b) for a, b in zip(server.parameters(), reference.parameters(), strict=True))
        moved = max(float((a.detach() - b.detach()).abs().max())
                    for a, b in zip(server.parameters(), start.parameters(), strict=True))
        t = time.perf_counter()
        for _ in range(3):
            plan.digest(server)
        seconds["digest"] = (time.perf_counter() - t) / 3
        row = {"setting": name, "optimizer": optimizer, "lr": lr, "steps": steps, "server_lr": server_lr,
               "client_influence_bounds": influences, "largest_real_weight_change": moved,
               "bound_over_real": max(influences) / moved if moved else None,
               "default_max_step_over_bound": DEFAULT_MAX_STEP / max(influences),
               "default_on_bitwise_equal_to_off": same, "seconds": seconds,
               "digest_share_of_client_round": seconds["digest"] / (seconds["local"] / CLIENTS
                                                                    + seconds["compress"] / CLIENTS
                                                                    + seconds["apply (incl. digest)"]),
               "max_influence_reported": agg.last_report["max_influence"], "start_digest": g.start_digest}
        print(json.dumps(row, indent=1), flush=True)
        results["settings"].append(row)
    for dtype in (torch.bfloat16,):
        m = copy.deepcopy(model).to(dtype)
        p16 = fk.FerretPlan.from_model(m, args.budget)
        t = time.perf_counter()
        for _ in range(3):
            p16.digest(m)
        results[f"digest_seconds_{str(dtype).removeprefix('torch.')}"] = (time.perf_counter() - t) / 3
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
