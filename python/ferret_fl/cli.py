"""ferret-fl: federated full-parameter fine-tuning with Ferret and its baselines.

    ferret-fl run --config configs/dolly-llama-3b.yaml --rounds 5 --output-dir runs/dolly
    ferret-fl run --algorithm fedavg --model smollm2-135m --data synthetic --rounds 3
    ferret-fl run ... --resume                 # continue the run in --output-dir
    ferret-fl demo                             # minutes: Ferret vs FedAvg, SmolLM2-135M on the shipped NI subset
    ferret-fl compare --output-dir runs/compare  # 5 algorithms x 5 seeds with confidence intervals (hours)
    ferret-fl report runs/a runs/b --plot runs/compare.png
    ferret-fl flower --nodes 2 ...             # the same run on Flower: SuperLink + 2 SuperNodes on 127.0.0.1
    ferret-fl flower ... --print-run-config > run.toml   # for `flwr run` on a real federation
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config, report


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
    from . import compare

    print(f"demo: {', '.join(args.algorithms)} on the shipped NI subset, {len(args.seeds)} training seed(s), "
          f"{compare.DEMO['rounds']} rounds of {compare.DEMO['clients_per_round']} clients, "
          f"{compare.DEMO['eval_samples']} held-out examples: fewer seeds, rounds, clients and examples than the full "
          f"comparison (`ferret-fl compare`: {len(compare.DEFAULT_SEEDS)} seeds x {len(compare.ALGORITHMS)} "
          f"algorithms, {compare.COMMON['rounds']} rounds of {compare.COMMON['clients_per_round']} clients, "
          f"{compare.COMMON['eval_samples']} examples), so its intervals are wide and it settles nothing.", flush=True)
    text = compare.compare(args.output_dir, algorithms=args.algorithms, seeds=args.seeds, sets=args.set,
                           defaults=compare.DEMO, progress=not args.no_progress)
    print("\n" + text)
    print(f"table: {os.path.join(args.output_dir, 'comparison.md')}\nplot: "
          f"{os.path.join(args.output_dir, 'comparison.png')}")
    return 0


def cmd_compare(args) -> int:
    from . import compare

    if args.readme:
        compare.check_readme(args.output_dir, args.readme)
    text = compare.compare(args.output_dir, algorithms=args.algorithms, seeds=args.seeds, sets=args.set,
                           keep_checkpoints=args.keep_checkpoints, report_only=args.report_only,
                           progress=not args.no_progress)
    print(text)
    print(f"table: {os.path.join(args.output_dir, 'comparison.md')}\nplot: "
          f"{os.path.join(args.output_dir, 'comparison.png')}")
    if args.readme:
        changed = compare.splice_readme(args.output_dir, args.readme, text)
        print(f"readme: {args.readme} {'updated' if changed else 'already carries this table'}")
    return 0


def cmd_flower(args) -> int:
    from .flower import launcher

    cfg = config.load(args.config, _overrides(args))
    if args.print_run_config:
        from .flower.settings import toml_lines

        print(toml_lines(launcher.app_run_config(cfg, "", min_nodes=args.nodes, resume=args.resume,
                                                 round_timeout=args.round_timeout)), end="")
        return 0
    workdir = args.workdir or os.path.join(cfg.output_dir, "flower")
    outcome = launcher.run_local(cfg, nodes=args.nodes, engine=args.engine, workdir=workdir, resume=args.resume,
                                 round_timeout=args.round_timeout, timeout=args.timeout)
    if not outcome.completed:
        print(f"ferret-fl: the Flower run {outcome.run_id} ended {outcome.status}; logs in {workdir}", file=sys.stderr)
        return 4
    print(report.compare([cfg.output_dir]))
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
    from . import compare as comparison
    from .compare import ALGORITHMS, DEFAULT_SEEDS, DEMO_ALGORITHMS, DEMO_SEEDS

    demo = sub.add_parser("demo", help="a few minutes of `compare`: SmolLM2-135M on the shipped NI subset, 1 seed")
    demo.add_argument("--output-dir", default="runs/demo", help="re-running resumes and skips finished runs")
    demo.add_argument("--algorithms", nargs="+", default=list(DEMO_ALGORITHMS), choices=list(ALGORITHMS))
    demo.add_argument("--seeds", nargs="+", type=int, default=list(DEMO_SEEDS))
    demo.add_argument("--set", action="append", default=[], metavar="[ALGORITHM.]KEY=VALUE",
                      help="override a setting, as for compare (e.g. device=cuda)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    comp = sub.add_parser("compare", help="every algorithm over several training seeds with confidence intervals "
                                          "(resumable)", description=comparison.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("--output-dir", default="runs/compare", help="one run directory per (algorithm, seed) inside")
    comp.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    comp.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="training seeds")
    comp.add_argument("--set", action="append", default=[], metavar="[ALGORITHM.]KEY=VALUE",
                      help="override a setting for every algorithm, or for one (e.g. fedkseed.local_steps=50)")
    comp.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' final weights (540 MB "
                                                                      "each for SmolLM2-135M)")
    comp.add_argument("--report-only", action="store_true", help="run nothing: the table and plot from the runs "
                                                                 "there")
    comp.add_argument("--readme", metavar="PATH", help="also put the table and plot into this README, between "
                                                       "its <!-- comparison: generated from DIR/comparison.md --> "
                                                       "and <!-- /comparison --> lines")
    comp.add_argument("--no-progress", action="store_true")
    comp.set_defaults(fn=cmd_compare)
    fl = sub.add_parser("flower", help="the run on Flower: a SuperLink and N SuperNodes (or N simulated nodes) on "
                                       "127.0.0.1, stopped when the run ends; or the run config for `flwr run`")
    _add_run_flags(fl)
    fl.add_argument("--nodes", type=int, default=2, help="nodes; node i trains the clients c with c %% nodes == i")
    fl.add_argument("--engine", choices=("deployment", "simulation"), default="deployment")
    fl.add_argument("--workdir", help="logs, FLWR_HOME and node caches (default: <output-dir>/flower; keep it to "
                                      "--resume)")
    fl.add_argument("--round-timeout", type=float, default=600.0,
                    help="seconds a round waits for a node before going on without it")
    fl.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds before the whole run is stopped")
    fl.add_argument("--print-run-config", action="store_true",
                    help="print the run config (TOML) for `flwr run --run-config` on a real federation and exit; "
                         "--nodes is its min-nodes, --output-dir a path on the SuperLink's machine")
    fl.set_defaults(fn=cmd_flower)
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
