"""ferret-fl: federated full-parameter fine-tuning with Ferret and its baselines.

    ferret-fl run --config configs/dolly-llama-3b.yaml --rounds 5 --output-dir runs/dolly
    ferret-fl run --algorithm fedavg --model smollm2-135m --data synthetic --rounds 3
    ferret-fl run ... --resume                 # continue the run in --output-dir
    ferret-fl demo                             # SmolLM2-135M, offline benchmark, Ferret vs FedAvg vs FedKSeed
    ferret-fl report runs/a runs/b --plot runs/compare.png
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config, report

# The demo: small enough for a 2-core CPU in minutes, large enough that Rouge-L moves.
DEMO = dict(model="smollm2-135m", data="synthetic", clients_per_round=2, rounds=3, local_steps=3, batch_size=2,
            grad_accum=1, max_length=256, lr=1e-3, eval_every=0, eval_samples=32, eval_loss_samples=48,
            max_new_tokens=16, eval_batch_size=16)
DEMO_ALGORITHMS = {
    # the demo's local lr is 10x the paper's: a server lr of 3 at the paper's scale keeps its server step
    "ferret": dict(scale="paper", server_lr=3.0, budget=7800),
    "fedavg": dict(),
    "fedkseed": dict(kseed_candidates=4096, kseed_eps=5e-4, kseed_lr=3e-5),
}


def _flag_type(name: str):
    """argparse type of setting ``name``: ``config.coerce``, named for argparse's error message."""
    typ, nullable = config.field_type(name)

    def convert(value: str):
        return config.coerce(name, value)

    convert.__name__ = typ.__name__ + (" or null" if nullable else "")
    return convert


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (see configs/); flags override it")
    settings = p.add_argument_group("settings", "every RunConfig field (also a key of the YAML config)")
    for name, f in config.FIELDS.items():
        metavar = None if name in config.CHOICES else config.field_type(name)[0].__name__.upper()
        settings.add_argument("--" + name.replace("_", "-"), dest=name, type=_flag_type(name), default=None,
                              choices=config.CHOICES.get(name), metavar=metavar,
                              help=f"{f.metadata['help']} (default: {f.default})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting as KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    p.add_argument("--no-progress", action="store_true")


def _overrides(args) -> dict:
    values = {name: getattr(args, name) for name in config.FIELDS}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE; got {item!r}")
        values[key.replace("-", "_")] = value
    return values


def cmd_run(args) -> int:
    from . import simulation

    cfg = config.load(args.config, _overrides(args))
    try:
        simulation.run(cfg, resume=args.resume, progress=not args.no_progress)
    except simulation.DivergedError as exc:
        print(report.compare([cfg.output_dir]))
        print(f"ferret-fl: stopped: {exc}", file=sys.stderr)
        return 3
    print(report.compare([cfg.output_dir]))
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import simulation
    from .models import load_causal_lm

    unknown = sorted(set(args.algorithms) - set(DEMO_ALGORITHMS))
    if unknown:
        raise SystemExit(f"demo algorithms are {sorted(DEMO_ALGORITHMS)}; got {unknown}")
    print(f"loading {DEMO['model']} (embedded) ...", flush=True)
    model, tokenizer = load_causal_lm(DEMO["model"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dirs, baseline = [], None
    for algo in args.algorithms:
        out = os.path.join(args.output_dir, algo)
        cfg = config.load(None, {**DEMO, **DEMO_ALGORITHMS[algo], "algorithm": algo, "output_dir": out,
                                 "seed": args.seed})
        print(f"\n=== {algo} ===", flush=True)
        with torch.no_grad():
            model.load_state_dict(initial)
        rows = simulation.run(cfg, resume=args.resume, progress=not args.no_progress, preloaded=(model, tokenizer),
                              baseline=baseline)
        baseline = baseline or rows[0]
        dirs.append(out)
    table = report.compare(dirs)
    png = report.plot(dirs, os.path.join(args.output_dir, "demo.png"))
    with open(os.path.join(args.output_dir, "demo.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nplot: {png}\ntable: {os.path.join(args.output_dir, 'demo.md')}")
    return 0


def cmd_report(args) -> int:
    print(report.compare(args.run_dirs))
    if args.plot:
        print(f"plot: {report.plot(args.run_dirs, args.plot)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ferret-fl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) one federated fine-tuning run")
    _add_run_flags(run)
    run.set_defaults(fn=cmd_run)
    demo = sub.add_parser("demo", help="the embedded default: SmolLM2-135M on the offline benchmark")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--algorithms", nargs="+", default=list(DEMO_ALGORITHMS))
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    rep = sub.add_parser("report", help="comparison table (and plot) from output directories")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--plot", help="write a PNG here")
    rep.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ferret-fl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
