"""Tables and plots from run directories (each with a metrics.jsonl).

Rows are read through ``metrics.read`` (the schema lives in ``metrics.py``).
``compare([dirs])`` gives one row per run: Rouge-L (the paper's code's definition) and
eval loss before and after, Rouge-L (rouge-score) and exact match after,
bytes sent per client per round (up and down), and mean seconds per phase per round.
``plot([dirs], path)`` draws eval loss and Rouge-L (paper) against round and against the
cumulative bytes communicated. Several seeds of each method with confidence intervals:
``ferret-fl compare`` (``compare.py``).
"""

from __future__ import annotations

import os

from .metrics import PHASES, read


def summarize(rows: list[dict]) -> dict:
    first, last = rows[0], rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    mean = lambda key: sum(r[key] for r in trained) / max(len(trained), 1)
    phases = {p: sum(r["seconds"].get(p, 0.0) for r in trained) / max(len(trained), 1) for p in PHASES}
    return {
        "algorithm": last["algorithm"], "rounds": last["round"],
        "rouge_before": first.get("rouge_l_paper"), "rouge_after": last.get("rouge_l_paper"),
        "rouge_google_after": last.get("rouge_l_google"), "exact_match_after": last.get("exact_match"),
        "loss_before": first["eval_loss"], "loss_after": last["eval_loss"],
        "up_per_client": mean("bytes_up_per_client") if trained else 0,
        "down_per_client": mean("bytes_down_per_client") if trained else 0,
        "seconds": phases,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def compare(run_dirs: list[str]) -> str:
    """Markdown table, one row per run directory."""
    head = ("| algorithm | rounds | Rouge-L (Ferret code) before → after | Rouge-L (rouge-score) | exact match | "
            "eval loss before → after | up / client / round | down / client / round | s/round: local | compress | "
            "aggregate | apply | eval |")
    lines = [head, "|" + "---|" * 13]
    for d in run_dirs:
        s = summarize(read(d))
        rouge = (f"{s['rouge_before']:.2f} → {s['rouge_after']:.2f}"
                 if s["rouge_before"] is not None and s["rouge_after"] is not None else "n/a")
        after = {k: "n/a" if s[k] is None else f"{s[k]:.2f}" for k in ("rouge_google_after", "exact_match_after")}
        sec = s["seconds"]
        lines.append(
            f"| {s['algorithm']} | {s['rounds']} | {rouge} | {after['rouge_google_after']} | "
            f"{after['exact_match_after']} | {s['loss_before']:.4f} → {s['loss_after']:.4f} | "
            f"{_fmt_bytes(s['up_per_client'])} | {_fmt_bytes(s['down_per_client'])} | {sec['local']:.1f} | "
            f"{sec['compress']:.2f} | {sec['aggregate']:.3f} | {sec['apply']:.2f} | {sec['evaluation']:.1f} |")
    return "\n".join(lines)


def plot(run_dirs: list[str], path: str) -> str:
    """PNG with eval loss and Rouge-L against round and against cumulative bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for d in run_dirs:
        rows = read(d)
        name = rows[-1]["algorithm"]
        rounds = [r["round"] for r in rows]
        sent = [max(r["cumulative_bytes"], 1) for r in rows]
        loss = [r["eval_loss"] for r in rows]
        axes[0][0].plot(rounds, loss, marker="o", label=name)
        axes[0][1].plot(sent, loss, marker="o", label=name)
        rouge = [(r["round"], max(r["cumulative_bytes"], 1), r["rouge_l_paper"]) for r in rows if "rouge_l_paper" in r]
        if rouge:
            axes[1][0].plot([x[0] for x in rouge], [x[2] for x in rouge], marker="o", label=name)
            axes[1][1].plot([x[1] for x in rouge], [x[2] for x in rouge], marker="o", label=name)
    for ax in axes[0][1], axes[1][1]:
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes communicated (up + down)")
    for ax in axes[0][0], axes[1][0]:
        ax.set_xlabel("round")
    for ax in axes[0]:
        ax.set_ylabel("held-out loss")
    for ax in axes[1]:
        ax.set_ylabel("Rouge-L F (%), Ferret code")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ferret-fl: held-out loss and Rouge-L vs rounds and bytes")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
