"""Byzantine clients on the shipped benchmark: Ferret with and without the server's defences.

Every row is one `ferret-fl run` (through ``simulation.run``, the embedded SmolLM2-135M on
the shipped NI subset): the clean run, then each attack (``ferret_fl.attacks``: scaled
x -100, random with 100x the honest norm, sign flip) with 10% and 20% of each round's
clients attacking, once with no defence (mean, influence_cap and max_step off) and once
with the defences (the default bounds plus coordinate-wise median). Prints a markdown
table (held-out loss per round, final Rouge-L, refusals) and plots the held-out loss
against rounds, one line per row.

    python benchmarks/bench_byzantine.py --out docs/img/byzantine.png --json byzantine.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from ferret_fl import config, simulation
from ferret_fl.models import load_causal_lm

# Small enough for a 2-core CPU: 10 clients a round so that 10% is one client, Rademacher
# bases (compress ~20x cheaper than Gaussian on the CPU; the defences act on the
# coefficients whatever the distribution), the guard off so damage is measured, not stopped.
SETTINGS = dict(algorithm="ferret", model="smollm2-135m", data="ni-subset", clients_per_round=10, rounds=2,
                local_steps=2, batch_size=2, grad_accum=1, max_length=1024, lr=3e-4, distribution="rademacher",
                eval_samples=13, eval_loss_samples=26, max_new_tokens=16, eval_batch_size=13, divergence_factor=0)
NO_DEFENCE = dict(aggregation="mean", influence_cap="null", max_step="null")
DEFENCE = dict(aggregation="median")
ATTACKS = ("scaled", "random", "sign_flip")
# 20% first: rows print as they finish, so a cut-short run answers the harder case first.
FRACTIONS = (0.2, 0.1)


def rows_to_run() -> list[tuple[str, dict]]:
    rows = [("clean", {})]
    for fraction in FRACTIONS:
        for attack in ATTACKS:
            for label, defence in (("no defence", NO_DEFENCE), ("defended", DEFENCE)):
                rows.append((f"{attack} {fraction:.0%} {label}", dict(attack=attack, byzantine_fraction=fraction,
                                                                         **defence)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img/byzantine.png")
    p.add_argument("--json")
    p.add_argument("--only", nargs="*", help="labels of the rows to run (default: all)")
    args = p.parse_args()

    model, tokenizer = load_causal_lm(SETTINGS["model"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="ferret-byzantine-") as workdir:
        for label, overrides in rows_to_run():
            if args.only and label not in args.only:
                continue
            cfg = config.load(None, {**SETTINGS, **overrides, "output_dir": os.path.join(workdir, str(len(results)))})
            with torch.no_grad():
                model.load_state_dict(initial)
            t = time.perf_counter()
            rows = simulation.run(cfg, progress=False, log=lambda s, label=label: print(f"[{label}] {s}", flush=True),
                                  preloaded=(model, tokenizer), baseline=baseline)
            baseline = baseline or rows[0]
            refused = [len(r.get("refusals", [])) for r in rows[1:]]
            attackers = [len(r.get("byzantine", [])) for r in rows[1:]]
            results.append({"row": label, "settings": overrides, "eval_loss": [r["eval_loss"] for r in rows],
                            "rouge_l_paper": rows[-1].get("rouge_l_paper"), "attackers": attackers,
                            "refused": refused, "reasons": sorted({x["reason"] for r in rows for x in
                                                                   r.get("refusals", [])}),
                            "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(results[-1]), flush=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": SETTINGS, "rows": results}, f, indent=1)
    plot(results, args.out)
    print(f"\nplot: {args.out}")


def table(results: list[dict]) -> str:
    lines = ["| row | held-out loss by round (0 → 2) | Rouge-L (paper) after | attackers / refused per round |",
             "|---|---|---|---|"]
    for r in results:
        losses = " → ".join(f"{x:.3f}" if x < 1e3 else f"{x:.2e}" for x in r["eval_loss"])
        rouge = "" if r["rouge_l_paper"] is None else f"{r['rouge_l_paper']:.2f}"
        counts = " · ".join(f"{a}/{f}" for a, f in zip(r["attackers"], r["refused"], strict=True))
        lines.append(f"| {r['row']} | {losses} | {rouge} | {counts}"
                     + (f" ({', '.join(r['reasons'])})" if r["reasons"] else "") + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, label in zip(axes, ("no defence", "defended"), strict=True):
        for r in results:
            if r["row"] == "clean" or r["row"].endswith(label):
                style = dict(color="black", linewidth=2.5) if r["row"] == "clean" else {}
                ax.plot(range(len(r["eval_loss"])), [min(x, 20.0) for x in r["eval_loss"]], marker="o",
                        label=r["row"], **style)
        ax.set_title(f"Ferret under attack, {label}")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (clipped at 20)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
