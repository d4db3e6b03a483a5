"""kill -9 `ferret-fl run` at random moments, resume each time, and demand the final
weights of an uninterrupted run bit for bit.

    python tests/crash_resume.py --kills 20           # make crash (issue 9: >= 20 kill points)
    python tests/crash_resume.py --kills 3 --rounds 3  # the CI-sized run in tests/test_crash.py

One uninterrupted reference run is timed first (tiny random LLaMA, synthetic data,
Ferret with server momentum so the server's state matters too). Then one output
directory is driven to completion by `ferret-fl run --resume` processes, each killed with
SIGKILL at a moment drawn uniformly over the reference run's duration, until ``--kills``
kills have landed. After every kill the directory must hold a loadable checkpoint (or
none yet) and a parseable metrics file: a checkpoint is never half-written. The phase the
process was in when it died is read from its log (training, compress, aggregation,
evaluation or checkpoint writing), so the report says where the kills landed. The
final weights and metrics must equal the reference's exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from ferret_fl import checkpoint, metrics

SETTINGS = dict(algorithm="ferret", model="llama-tiny-shape", data="synthetic", clients_per_round=2, local_steps=2,
                batch_size=2, grad_accum=1, max_length=512, lr=1e-2, server_lr=1.0, budget=96,
                seed_schedule="fixed", server_momentum=0.9, eval_samples=4, eval_loss_samples=8,
                max_new_tokens=4, eval_batch_size=4)


def command(output_dir: str, rounds: int, resume: bool) -> list[str]:
    args = [sys.executable, "-u", "-m", "ferret_fl.cli", "run", "--no-progress", "--rounds", str(rounds),
            "--output-dir", output_dir]
    for key, value in SETTINGS.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args + (["--resume"] if resume else [])


def phase_of(log: str) -> str:
    """The phase a killed run was in, from the last line it printed (the loop logs each
    finished round; a round logged but not yet checkpointed is the checkpoint write)."""
    lines = [ln for ln in log.splitlines() if ln.startswith(("round ", "resuming", "no checkpoint"))]
    if not lines:
        return "start-up"
    last = lines[-1]
    if last.startswith("round ") and "train loss" in last:
        return "checkpoint or next round's training"
    return "training, compress, aggregation or evaluation"


def check_consistent(output_dir: str) -> int:
    """The finished round a resume would continue from; raises if anything is half-written."""
    ckpt = os.path.join(output_dir, "checkpoint")
    if not checkpoint.exists(ckpt):
        return 0
    state = checkpoint.read_state(ckpt)
    weights = checkpoint.weights(ckpt)
    if not weights or not all(bool(torch.isfinite(w).all()) for w in weights.values()):
        raise AssertionError(f"{ckpt}: weights missing or not finite after a kill")
    rows = metrics.read(output_dir)
    if [r["round"] for r in rows][: state["round"] + 1] != list(range(state["round"] + 1)):
        raise AssertionError(f"{output_dir}: metrics rows {[r['round'] for r in rows]} do not cover the checkpoint's "
                             f"round {state['round']}")
    return int(state["round"])


def run_to_end(output_dir: str, rounds: int) -> None:
    done = subprocess.run(command(output_dir, rounds, resume=True), capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"resume failed ({done.returncode}):\n{done.stderr[-2000:]}")


def crash_and_resume(kills: int, rounds: int, seed: int, workdir: str, log=print) -> dict:
    rng = random.Random(seed)
    reference = os.path.join(workdir, "reference")
    t = time.perf_counter()
    done = subprocess.run(command(reference, rounds, resume=False), capture_output=True, text=True)
    duration = time.perf_counter() - t
    if done.returncode != 0:
        raise AssertionError(f"reference run failed:\n{done.stderr[-2000:]}")
    log(f"reference run: {rounds} rounds in {duration:.1f} s")

    crashed = os.path.join(workdir, "crashed")
    landed, phases, attempts = [], {}, 0
    while len(landed) < kills:
        attempts += 1
        before = check_consistent(crashed)
        if before == rounds:
            log(f"run finished after {len(landed)} kills; starting it over to place the rest")
            shutil.rmtree(crashed)
            before = 0
        delay = rng.uniform(0.0, duration)
        logfile = os.path.join(workdir, f"attempt-{attempts}.log")
        with open(logfile, "w") as out:
            proc = subprocess.Popen(command(crashed, rounds, resume=True), stdout=out, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if proc.returncode != -signal.SIGKILL:
            if proc.returncode != 0:
                raise AssertionError(f"attempt {attempts} exited {proc.returncode}: see {logfile}")
            continue
        with open(logfile) as f:
            phase = phase_of(f.read())
        after = check_consistent(crashed)
        landed.append({"delay_s": round(delay, 2), "round_before": before, "round_after": after, "phase": phase})
        phases[phase] = phases.get(phase, 0) + 1
        log(f"kill {len(landed)}/{kills} at {delay:5.1f} s ({phase}): checkpoint round {before} -> {after}")
    run_to_end(crashed, rounds)

    a = checkpoint.weights(os.path.join(reference, "checkpoint"))
    b = checkpoint.weights(os.path.join(crashed, "checkpoint"))
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("seconds", "peak_memory_bytes")
    rows_a = [{k: v for k, v in r.items() if k not in strip} for r in metrics.read(reference)]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in metrics.read(crashed)]
    leftovers = sorted(f for f in os.listdir(os.path.join(crashed, "checkpoint")) if ".tmp-" in f)
    result = {"kills": len(landed), "attempts": attempts, "rounds": rounds, "reference_seconds": round(duration, 1),
              "phases": phases, "weights_bitwise_equal": equal, "metrics_equal": rows_a == rows_b,
              "temporary_files_left": leftovers, "kill_points": landed}
    if not equal or rows_a != rows_b or leftovers:
        raise AssertionError(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferret-crash-") as workdir:
        result = crash_and_resume(args.kills, args.rounds, args.seed, workdir)
    print(json.dumps({k: v for k, v in result.items() if k != "kill_points"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
