"""Client-level DP in K dimensions (Ferret) against DP-FedAvg in d dimensions, same epsilon.

Synthetic client updates Delta_i = mu + h_i in d dimensions (||mu|| = 1, h_i isotropic
with ||h_i|| = 1: a shared direction plus client heterogeneity). Four releases of the
round's mean update Delta_bar:

- fedavg:        Delta_bar itself (no privacy, no compression);
- dp-fedavg:     (sum_i clip(Delta_i, C) + N(0, z^2 C^2 I_d)) / n, C = median ||Delta_i||;
- ferret:        V^T (mean_i gamma_i), gamma_i = V Delta_i / (rho K), one shared seed;
- ferret-dp:     ``Aggregator(dp=DifferentialPrivacy(z, C', n))`` on the same gamma_i,
                 C' = median ||D gamma_i|| (the estimated weight-space norm), rebuilt.

Both DP releases are the same sampled Gaussian mechanism with the same noise multiplier
z, so they have the same (epsilon, delta) (dp-accounting's RDP accountant, printed). For
each, over seeds: the relative error ||release - Delta_bar|| / ||Delta_bar||, the part of
it the privacy noise adds, and the signal-to-noise ratio along Delta_bar. The derivation
these are compared with is in docs/privacy.md.

    python benchmarks/bench_dp.py [--d 32768] [--seeds 5] [--json out.json] [--plot docs/img/dp_noise.png]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import ferret_kernels as fk
from ferret_kernels.dp import epsilon

KS = (64, 256, 1024)
CLIENTS = (10, 100, 1000)
Z = 1.0
DELTA = 1e-5


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return x * torch.clamp(bound / norms, max=1.0)


def one(d: int, K: int, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    mu /= mu.norm()
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h /= h.norm(dim=1, keepdim=True)
    deltas = mu + h
    target = deltas.mean(0)
    out = {}

    C = float(deltas.norm(dim=1).median())
    clipped_mean = clip_rows(deltas, C).sum(0) / n
    noise = torch.randn(d, generator=g, dtype=torch.float64) * Z * C / n
    out["dp-fedavg"] = (clipped_mean + noise, clipped_mean)

    plan = fk.FerretPlan.from_shapes([("w", (d,), torch.float32)], K, grouping="tensor", backend="cpu")
    V = fk.basis(1000 + seed, K, d, backend="cpu").double()
    gammas = (deltas @ V.T / K).float()  # unbiased scale 1 / (rho K), rho = 1
    counts = (K,)

    def release(**options):
        agg = fk.Aggregator(plan, base_seed=1000 + seed, seed_schedule="fixed", weighting="equal", max_step=None,
                            sample_cap=None, **options)
        for i in range(n):
            agg.add(fk.ClientUpdate(0, agg.seed, counts, gammas[i].contiguous(), 1, plan.fingerprint), client_id=i)
        return V.T @ agg.aggregate().coefficients[0].double(), agg

    ferret, _ = release()
    out["ferret"] = (ferret, ferret)
    norms_D = gammas.double().norm(dim=1) * math.sqrt(d)
    C_prime = float(norms_D.median())
    dp = fk.DifferentialPrivacy(Z, C_prime, n, delta=DELTA, seed=seed)
    noisy, agg = release(dp=dp)
    clip_only = V.T @ (clip_rows(gammas.double() * math.sqrt(d), C_prime).sum(0) / n / math.sqrt(d))
    out["ferret-dp"] = (noisy, clip_only)
    u = target / target.norm()
    row = {"d": d, "K": K, "n": n, "seed": seed, "C": C, "C_prime": C_prime, "epsilon": agg.dp_epsilon}
    for name, (rel, noiseless) in out.items():
        err = float((rel - target).norm() / target.norm())
        noise_part = rel - noiseless
        row[f"{name}:rel_error"] = err
        row[f"{name}:noise_norm"] = float(noise_part.norm() / target.norm())
        row[f"{name}:noise_along_signal"] = float(noise_part.dot(u).abs() / target.norm())
        row[f"{name}:cosine"] = float(rel.dot(target) / (rel.norm() * target.norm()))
    return row


def ci95(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, 1.96 * s / math.sqrt(len(values))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    colors = {KS[0]: "tab:blue", KS[1]: "tab:orange", KS[2]: "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("dp-fedavg", "ferret", "ferret-dp"):
        for K in (KS if name != "dp-fedavg" else KS[:1]):
            pts = [s for s in summary if s["release"] == name and s["K"] == K]
            style = {"dp-fedavg": dict(color="black"), "ferret": dict(color=colors[K], linestyle="--"),
                     "ferret-dp": dict(color=colors[K])}[name]
            label = name if name == "dp-fedavg" else f"{name} K={K}"
            for ax, metric in zip(axes, ("rel_error", "noise_norm"), strict=True):
                if metric == "noise_norm" and name == "ferret":
                    continue
                ax.errorbar([s["n"] for s in pts], [s[metric] for s in pts], yerr=[s[f"{metric}_ci95"] for s in pts],
                            marker="o", label=label, capsize=3, **style)
    for ax, title in zip(axes, ("relative error of the released mean update",
                                "privacy noise alone (relative norm)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients per round n")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"d = {result['d']}, z = {result['z']}, epsilon = {result['epsilon']:.2f} at delta = "
                 f"{result['delta']} per round; {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=32768)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--replot", help="draw --plot from a previous --json instead of measuring")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.plot)
        return
    eps = epsilon([(1.0, Z)], DELTA)
    print(f"noise multiplier z = {Z}, one round, q = 1: epsilon = {eps:.3f} at delta = {DELTA} (both DP releases)")
    rows = []
    for K in KS:
        for n in CLIENTS:
            for s in range(args.seeds):
                rows.append(one(args.d, K, n, s))
            print(f"K={K} n={n} done", flush=True)
    summary = []
    print(f"\nd = {args.d}; mean and 95% CI over {args.seeds} seeds; errors relative to ||Delta_bar||")
    print("| K | n | release | rel. error | noise norm | noise along signal | cosine |")
    print("|---|---|---|---|---|---|---|")
    for K in KS:
        for n in CLIENTS:
            sel = [r for r in rows if r["K"] == K and r["n"] == n]
            for name in ("dp-fedavg", "ferret", "ferret-dp"):
                if name == "dp-fedavg" and K != KS[0]:
                    continue
                stats = {m: ci95([r[f"{name}:{m}"] for r in sel])
                         for m in ("rel_error", "noise_norm", "noise_along_signal", "cosine")}
                summary.append({"K": K, "n": n, "release": name, **{m: v[0] for m, v in stats.items()},
                                **{f"{m}_ci95": v[1] for m, v in stats.items()}})
                print(f"| {K if name != 'dp-fedavg' else '-'} | {n} | {name} | "
                      + " | ".join(f"{stats[m][0]:.3g} ± {stats[m][1]:.2g}"
                                   for m in ("rel_error", "noise_norm", "noise_along_signal", "cosine")) + " |")
    result = {"d": args.d, "z": Z, "delta": DELTA, "epsilon": eps, "seeds": args.seeds, "summary": summary,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
