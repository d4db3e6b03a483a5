"""One Ferret client round and server apply on a real model, timed phase by phase.

Loads a model (default: the embedded SmolLM2-135M-Instruct), takes a few SGD steps on
instruction data from the shipped synthetic benchmark, then times with the library API:
compress (snapshot diff + one project_blocks launch), encode, decode + aggregate, apply
(one reconstruct_blocks_ launch), and a client replay of the GlobalUpdate, which must
give the server's weights bit for bit. Prints the message sizes too.

    python benchmarks/bench_round.py [--model smollm2-135m] [--budget 7800] [--distribution gaussian]
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--budget", type=int, default=7800)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--distribution", default="gaussian", choices=fk.DISTRIBUTIONS)
    p.add_argument("--backend", default="auto")
    p.add_argument("--json")
    args = p.parse_args()

    model, tokenizer = load_causal_lm(args.model)
    plan = fk.FerretPlan.from_model(model, args.budget, distribution=args.distribution, backend=args.backend)
    replica = copy.deepcopy(model)
    items = tokenize_examples(load_synthetic().clients[0].examples[:8], tokenizer, 256)
    batch = collate(items, tokenizer.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    seconds = {}

    t = time.perf_counter()
    with plan.client_round(model, round=1, seed=fk.round_seed(7, 1), num_samples=len(items)) as cr:
        for _ in range(args.steps):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        seconds["local"] = time.perf_counter() - t
        t = time.perf_counter()
    seconds["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    up = fk.encode_client_update(cr.update)
    seconds["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    agg = fk.Aggregator(plan, round=1, base_seed=7, server_lr=1.0)
    agg.add(fk.decode_client_update(up, plan, round=1))
    update = agg.aggregate()
    seconds["aggregate"] = time.perf_counter() - t
    t = time.perf_counter()
    update.apply_(model)
    seconds["apply"] = time.perf_counter() - t
    down = fk.encode_global_update(update)
    t = time.perf_counter()
    fk.decode_global_update(down, plan, round=1).apply_(replica)
    seconds["replay"] = time.perf_counter() - t
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replica.state_dict().values(),
                                                  strict=True))
    work = sum(s * c for s, c in zip(plan.block_sizes, cr.update.counts, strict=True))
    result = dict(model=args.model, parameters=plan.numel, blocks=plan.num_blocks, budget=args.budget,
                  distribution=args.distribution, backend=fk.backends.resolve(args.backend, torch.device("cpu")),
                  threads=torch.get_num_threads(), bytes_up=len(up), bytes_down=len(down),
                  element_bases=work, seconds=seconds, replay_bitwise_equal=same)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not same:
        raise SystemExit("the client replay differs from the server's weights")


if __name__ == "__main__":
    main()
