"""FedPT offline: the large base, the small model before and after distillation, and the proxy, measured.

    python benchmarks/bench_fedpt.py                                   # run the shrunk offline setting, then tabulate
    python benchmarks/bench_fedpt.py --report-only --run-dir runs/fedpt-offline-measured

Runs ``configs/fedpt-offline.yaml`` (the embedded SmolLM2-135M as the large model, its first 3
and last 3 decoder layers as the small one, Ferret clients, the shipped NI subset) with the
settings below, which shrink it to finish in about 20 minutes on one CPU thread, then reads
the run's ``metrics.jsonl`` (every figure is measured by the run: held-out loss each round,
generation metrics at rounds 0 and last, message bytes, the process's peak RSS) and prints
one table (the large base's generation metrics are at round 0, the others at the last round).
Memory: the simulation holds server and clients in one process, so its peak RSS is the
server's upper bound; the per-role model state is also given, computed from the
parameter counts (float32): a client holds the small model, its gradients and Ferret's
snapshot; the server the large model, the small base, the global small model, the tuned
copy, the student with its gradients and the replayed copy.
"""

from __future__ import annotations

import argparse

from ferret_fl import config, metrics, simulation

SHRINK = dict(rounds=2, clients_per_round=2, local_steps=3, grad_accum=2, max_length=256, fedpt_distill_steps=4,
              fedpt_distill_prompts=8, fedpt_distill_tokens=16, fedpt_distill_lr=3e-5, eval_samples=13,
              eval_loss_samples=13, max_new_tokens=24)
# (label, view in each row's ``views``; None: the row itself, the small model every peer holds)
ROWS = (("large base (SmolLM2-135M, 30 layers; never trained)", "large_base"),
        ("small: round 0 base, then each round's distilled model (the next round's start)", None),
        ("small tuned (Ferret, before distillation)", "small_tuned"),
        ("proxy: large + (small - anti-expert base)", "proxy"))
GENERATION = ("rouge_l_paper", "rouge_l_google", "exact_match")


def table(run_dir: str, large_params: int, small_params: int) -> str:
    rows = metrics.read(run_dir)
    last = rows[-1]
    lines = ["| model | " + " | ".join(f"held-out loss, round {r['round']}" for r in rows)
             + f" | Rouge-L (Ferret code), round {last['round']} | Rouge-L (rouge-score) | exact match |",
             "|---|" + "---:|" * (len(rows) + 3)]
    for label, view in ROWS:
        entries = [r if view is None else r.get("views", {}).get(view) for r in rows]
        losses = [f"{e['eval_loss']:.3f}" if e else "–" for e in entries]
        final = entries[-1] if view != "large_base" else entries[0]
        quality = [f"{final[m]:.2f}" if final and m in final else "–" for m in GENERATION]
        lines.append(f"| {label} | " + " | ".join(losses + quality) + " |")
    trained = rows[1:]
    up = sum(r["bytes_up_per_client"] for r in trained) / len(trained)
    down = sum(r["bytes_down_per_client"] for r in trained) / len(trained)
    dist = [r.get("distillation", {}) for r in trained]
    mb = 4 / 1e6
    lines += ["", f"bytes per client and round: up {up:,.0f}, down {down:,.0f} (mean over {len(trained)} rounds)",
              "distillation per round (KL(proxy || small) on the server's sequences, before -> after, on the "
              "replayed model): " + "; ".join(
                  f"round {r['round']}: {d.get('kl_before', float('nan')):.4f} -> {d.get('kl_after', float('nan')):.4f}"
                  f" ({'kept' if d.get('kept') else 'dropped'}, {d.get('tokens', 0)} tokens, "
                  f"{d.get('seconds', 0):.0f} s)" for r, d in zip(trained, dist, strict=True)),
              f"peak RSS of the one simulation process (server + clients): "
              f"{max(r['peak_memory_bytes'] for r in trained) / 1e9:.2f} GB",
              f"model state, computed from parameter counts (large {large_params:,}, small {small_params:,}; "
              f"float32): client {3 * small_params * mb:,.0f} MB (weights, gradients, snapshot); server "
              f"{(large_params + 6 * small_params) * mb:,.0f} MB (large, small base, global, tuned, student + "
              "gradients, replayed)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fedpt-offline.yaml")
    parser.add_argument("--run-dir", default="runs/fedpt-offline-measured")
    parser.add_argument("--report-only", action="store_true", help="tabulate an existing run")
    args = parser.parse_args(argv)
    cfg = config.load(args.config, {**SHRINK, "output_dir": args.run_dir})
    if not args.report_only:
        simulation.run(cfg, progress=False)
    from ferret_fl.algorithms import prepare_model
    from ferret_fl.models import load_causal_lm

    large = load_causal_lm(cfg.large_model)[0]
    large_params = sum(p.numel() for p in large.parameters())
    small_params = sum(p.numel() for p in prepare_model(cfg, large).parameters())
    print(table(args.run_dir, large_params, small_params))


if __name__ == "__main__":
    main()
