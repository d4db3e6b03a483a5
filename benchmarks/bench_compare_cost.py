"""What one run of ``ferret-fl compare`` costs before it is started: the CPU seconds of one
client's local work and of the server's apply for an algorithm at the comparison's settings,
measured on the first steps of round 1's real clients and extrapolated to 12 rounds.

    OMP_NUM_THREADS=1 python benchmarks/bench_compare_cost.py --algorithm fedkseed --steps 8

Seconds are this thread's CPU time (``time.thread_time``; with one thread the whole of the work),
so another job on the machine does not inflate them. The extrapolation assumes round 1's
clients and examples are typical; the evaluation (held-out loss every round, Rouge-L after the
last) comes on top and is the same for every algorithm (a finished run's metrics give it).
"""

from __future__ import annotations

import argparse
import time

import torch

from ferret_fl import compare, simulation
from ferret_fl.algorithms import build_client, build_server, prepare_model
from ferret_fl.data import tokenize_examples
from ferret_fl.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="fedkseed", choices=list(compare.ALGORITHMS))
    parser.add_argument("--steps", type=int, default=8, help="local steps timed per client (of local_steps)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cfg = compare.build_configs("/tmp/unused", [args.algorithm], [args.seed], {}, {})[(args.algorithm, args.seed)]
    dataset = simulation.load_dataset(cfg)
    model, tokenizer = load_causal_lm(cfg.model, cfg.dtype, cfg.device, seed=cfg.seed)
    model = prepare_model(cfg, model)
    server, client = build_server(cfg, model), build_client(cfg, model)
    announcement = server.announce(1)
    timed = min(args.steps, cfg.local_steps)
    local, uploads = [], []
    for c in simulation.sample_clients(cfg, 1, dataset.num_clients):
        items = tokenize_examples(dataset.clients[c].examples, tokenizer, cfg.max_length)
        steps = simulation.client_steps(cfg, items, 1, c, tokenizer.pad_token_id, client)[:timed]
        t = time.thread_time()
        uploads.append(client.train(model, steps, announcement, client_id=c,
                                    num_samples=len(simulation.usable_examples(items))).payload)
        local.append((time.thread_time() - t) / len(steps))
        print(f"client {c}: {local[-1]:.2f} CPU s a step ({len(steps)} steps)", flush=True)
    t = time.thread_time()
    downlink = server.aggregate(1, uploads)
    with torch.no_grad():
        server.apply_(model, downlink, 1)
    apply = time.thread_time() - t
    per_step = sum(local) / len(local)
    clients = len(local)
    local_hours = per_step * cfg.local_steps * clients * cfg.rounds / 3600
    print(f"{args.algorithm}: {per_step:.2f} CPU s a local step (mean of {clients} clients x {timed} steps); "
          f"a round's {clients} x {cfg.local_steps} steps: {per_step * cfg.local_steps * clients / 60:.1f} min; "
          f"{cfg.rounds} rounds: {local_hours:.2f} h of local work; server aggregate+apply of this "
          f"{timed}-step round: {apply:.1f} s")
    if args.algorithm == "fedkseed":
        # The server replays one perturbation pass per distinct direction the round's steps drew.
        used = int(torch.count_nonzero(server.accumulated))
        draws = cfg.local_steps * clients
        expected = cfg.kseed_candidates * (1 - (1 - 1 / cfg.kseed_candidates) ** draws)
        print(f"fedkseed server: {apply / used:.2f} CPU s a direction ({used} used); a full round draws {draws} "
              f"of {cfg.kseed_candidates} (~{expected:.0f} distinct): ~{apply / used * expected / 60:.1f} min a "
              f"round, {apply / used * expected * cfg.rounds / 3600:.2f} h over {cfg.rounds} rounds")


if __name__ == "__main__":
    main()
