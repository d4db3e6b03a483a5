"""Ferret on Flower, measured on 127.0.0.1: what the engine adds to a round.

    .venv/bin/python benchmarks/bench_flower.py --json benchmarks/flower.json        # SmolLM2-135M, K = 7800
    .venv/bin/python benchmarks/bench_flower.py --model llama-tiny-shape --data synthetic --budget 96   # minutes

Three runs of one config (one client a round):

1. in-process: ``ferret_fl.simulation.run``, each round timed (the reference);
2. deployment engine: a SuperLink and 2 SuperNodes, each SuperNode connected through a
   TCP relay that counts every byte of its connection (Flower's Fleet API over HTTP:
   headers, polls, heartbeats); SuperNode 1 starts while round ``--missed`` runs, so its first message
   carries the ``--missed`` GlobalUpdates it lacks (catch-up by replay; the seed is the
   first from ``--seed`` whose rounds 1..missed each have a client for node 0);
3. simulation engine: 2 virtual nodes (Ray), for its round time.

Reported (markdown, and everything in ``--json``):

- bytes per client per round: the in-process count (the encoded upload and downlink),
  Flower's serialized messages (``protocol.message_bytes``) and the relay's TCP bytes,
  over rounds whose node was one round behind (one GlobalUpdate down, one upload up);
- per-round engine time against the in-process round, split into the server's work
  (aggregate, apply, evaluation, checkpoint), the node's handler (imports, its model
  from its cache, replay, training) and the rest (Flower: a ClientApp process per message
  and Flower's imports, transport, polling);
- the catch-up: node 1's first message (GlobalUpdates, Flower message, TCP) against
  downloading the model (its safetensors file, and a Flower message carrying it as an
  ArrayRecord, as Flower's own FedAvg ships it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import environment

from ferret_fl import config, metrics, simulation
from ferret_fl.flower import protocol
from ferret_fl.flower.launcher import OFFLINE_ENV, LocalFederation, app_run_config, descendants, project_dir
from ferret_fl.flower.strategy import FLOWER_FILE

POLL = 0.2
# `flwr ls` takes seconds on a loaded machine: the run's status is read this often.
STATUS_EVERY = 5.0
# Flower's per-message ClientApp process imports torch and transformers: a round of
# SmolLM2-135M takes minutes on 2 loaded cores, and a live node must not be timed out.
ROUND_TIMEOUT = 1800.0


class CountingRelay:
    """127.0.0.1:port -> 127.0.0.1:target, counting the bytes of every connection each way."""

    def __init__(self, target_port: int):
        self.target_port, self.up, self.down = target_port, 0, 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _connection(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the SuperLink is gone (the federation is stopping)
            writer.close()
            return

        async def pipe(src, dst, upward: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def counts(self) -> tuple[int, int]:
        return self.up, self.down

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_config(args, output_dir: str, seed: int | None = None):
    """One client a round (a fraction 1 / clients), so a round's bytes and time are one client's."""
    return config.load(None, {"model": args.model, "data": args.data, "rounds": args.missed + 4,
                              "clients_per_round": 1 / args.num_clients, "local_steps": 1, "batch_size": 1, "grad_accum": 1,
                              "max_length": args.max_length, "lr": 1e-4, "budget": args.budget,
                              "eval_samples": 1, "eval_loss_samples": 2, "max_new_tokens": 4, "eval_batch_size": 2,
                              "divergence_factor": 0, "output_dir": output_dir,
                              "seed": args.seed if seed is None else seed})


def scenario_seed(args) -> int:
    """The first seed from --seed whose rounds 1..missed sample a client of partition 0 and
    round missed + 1 one of partition 1: node 0 trains alone (a round nobody can train would
    wait for node 1), then node 1's first message carries exactly ``missed`` GlobalUpdates."""
    wanted = [0] * args.missed + [1]
    for seed in range(args.seed, args.seed + 10000):
        cfg = run_config(args, "unused", seed)
        if [simulation.sample_clients(cfg, r, args.num_clients)[0] % 2 for r in range(1, args.missed + 2)] == wanted:
            return seed
    raise RuntimeError(f"no seed in [{args.seed}, {args.seed + 10000}) gives the scenario")


def in_process(cfg, log) -> dict:
    """Round walls of the in-process simulation (between its per-round log lines)."""
    stamps = []

    def stamp(line: str) -> None:
        stamps.append(time.perf_counter())
        log(f"  in-process: {line[:100]}")

    simulation.run(cfg, progress=False, log=stamp)
    rows = metrics.read(cfg.output_dir)
    return {"round_seconds": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "rows": rows}


def _rounds_done(cfg) -> int:
    try:
        return metrics.read(cfg.output_dir)[-1]["round"]
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _started_at(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def _written_at(path: str) -> float:
    """When ``path`` was last written, in seconds since boot (the clock of _started_at)."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return os.path.getmtime(path) - (time.time() - uptime)


def _clientapp_since(supernode_pid: int, since: float) -> bool:
    for pid in descendants(supernode_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"flwr-clientapp" in f.read() and _started_at(pid) >= since:
                    return True
        except (FileNotFoundError, IndexError):
            continue
    return False


def deployment(cfg, args, workdir: str, log) -> dict:
    """The deployment run; TCP bytes per node and round (relay counters at each round's end)."""
    fed = LocalFederation(workdir, 2, "deployment", log=log)
    relays: dict[int, CountingRelay] = {}
    tcp: dict[int, dict[int, tuple[int, int]]] = {0: {}, 1: {}}  # partition -> round -> (up, down) at its end
    t0 = time.perf_counter()
    try:
        fed.start(partitions=[])
        relays[0] = CountingRelay(fed.port)
        fed.start_node(0, superlink=f"127.0.0.1:{relays[0].port}")
        run_id = fed.submit(project_dir(), app_run_config(cfg, fed.cache_dir, min_nodes=1, round_timeout=ROUND_TIMEOUT,
                                                          query_timeout=600.0))
        seen, status, status_at = 0, "", 0.0
        while not status.startswith("finished"):
            if time.monotonic() > status_at + STATUS_EVERY:
                status, status_at = str(fed.status(run_id)["status"]), time.monotonic()
            done = _rounds_done(cfg)
            while seen < done:
                seen += 1
                for p, relay in relays.items():
                    tcp[p][seen] = relay.counts()
                log(f"  deployment: round {seen} done at {time.perf_counter() - t0:.0f} s")
            if done == args.missed - 1 and 1 not in relays:
                since = _written_at(metrics.path(cfg.output_dir)) - 0.1
                while not _clientapp_since(fed.supernodes[0].pid, since):
                    time.sleep(POLL)  # round `missed` has sent its messages: node 1 joins the round after
                relays[1] = CountingRelay(fed.port)
                tcp[1][done] = (0, 0)
                fed.start_node(1, superlink=f"127.0.0.1:{relays[1].port}")
            time.sleep(POLL)
        for p, relay in relays.items():
            tcp[p]["end"] = relay.counts()
    finally:
        fed.stop()
        for relay in relays.values():
            relay.close()
    if status != "finished:completed":
        raise RuntimeError(f"the deployment run ended {status}; see {workdir}")
    with open(os.path.join(cfg.output_dir, FLOWER_FILE)) as f:
        engine = [json.loads(line) for line in f if line.strip()]
    return {"engine": engine, "rows": metrics.read(cfg.output_dir), "tcp": tcp, "seconds": time.perf_counter() - t0}


def simulation_engine(cfg, workdir: str, log) -> dict:
    t0 = time.perf_counter()
    with LocalFederation(workdir, 2, "simulation", log=log) as fed:
        outcome = fed.run_app(app_run_config(cfg, fed.cache_dir, min_nodes=2, round_timeout=ROUND_TIMEOUT,
                                             query_timeout=600.0), timeout=4 * 3600)
    if not outcome.completed:
        raise RuntimeError(f"the simulation-engine run ended {outcome.status}; see {workdir}")
    with open(os.path.join(cfg.output_dir, FLOWER_FILE)) as f:
        engine = [json.loads(line) for line in f if line.strip()]
    return {"engine": engine, "rows": metrics.read(cfg.output_dir), "seconds": time.perf_counter() - t0}


def model_download(cfg) -> dict:
    """Bytes of the model the nodes hold: its safetensors file and a Flower message carrying it."""
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import save

    from ferret_fl.flower.peer import build_model

    model, _ = build_model(cfg)
    # named_parameters() lists a tied tensor once (SmolLM2's lm_head is its embedding), as
    # the node's cache stores it; a state_dict would count it twice
    state = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    safetensors_bytes = len(save(state))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a Message needs them outside a runtime
    message = Message(RecordDict({"arrays": ArrayRecord(state)}), dst_node_id=2, message_type="train")
    return {"safetensors_bytes": safetensors_bytes, "flower_message_bytes": protocol.message_bytes(message),
            "parameters": sum(p.numel() for p in model.parameters()), "fab_bytes": fab_bytes()}


def fab_bytes() -> int:
    """Size of the app's FAB (``flwr build``), which a SuperNode fetches once per run."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "flwr"), "build", "--app", project_dir()],
                       cwd=tmp, check=True, capture_output=True, env={**os.environ, **OFFLINE_ENV})
        (fab,) = [f for f in os.listdir(tmp) if f.endswith(".fab")]
        return os.path.getsize(os.path.join(tmp, fab))


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarize(ref: dict, dep: dict, sim: dict, download: dict, missed: int) -> dict:
    rows = {r["round"]: r for r in dep["rows"]}
    nodes = {r["round"]: r for r in dep["engine"] if "nodes" in r}
    partition_of = {}
    per_client = []
    for r, entry in sorted(nodes.items()):
        for n in entry["nodes"]:
            partition_of.setdefault(n["node_id"], n["clients"][0] % 2)
            if r == 1 or n.get("replayed") != 1:  # one GlobalUpdate down, one ClientUpdate up
                continue
            p = partition_of[n["node_id"]]
            tcp = dep["tcp"][p]
            if r - 1 not in tcp or r not in tcp:
                continue
            up = tcp[r][0] - tcp[r - 1][0]
            down = tcp[r][1] - tcp[r - 1][1]
            per_client.append({"round": r, "node": p, "upload": rows[r]["bytes_up_per_client"],
                               "downlink": rows[r]["bytes_down_per_client"], "message_up": n["bytes_from_node"],
                               "message_down": n["bytes_to_node"], "tcp_up": up, "tcp_down": down})
    # a connection with no message in a round carries only polls and heartbeats
    idle = []
    for r, entry in sorted(nodes.items()):
        busy = {partition_of.get(n["node_id"]) for n in entry["nodes"]}
        for p, tcp in dep["tcp"].items():
            if p not in busy and r - 1 in tcp and r in tcp and r > missed + 1:
                idle.append((tcp[r][0] - tcp[r - 1][0] + tcp[r][1] - tcp[r - 1][1]) / entry["round_seconds"])
    joined = [n for n in nodes[missed + 1]["nodes"] if partition_of[n["node_id"]] == 1]
    catch_up = None
    if joined:
        n = joined[0]
        tcp = dep["tcp"][1]
        catch_up = {"replayed": n["replayed"], "replay_bytes": n["replay_bytes"], "message_bytes": n["bytes_to_node"],
                    "tcp_down": tcp[missed + 1][1] - tcp[missed][1], "tcp_up": tcp[missed + 1][0] - tcp[missed][0],
                    "clients": len(n["clients"]), **download}

    def timing(engine_rows, metric_rows, rounds, reference):
        out = []
        for r in rounds:
            e = next(x for x in engine_rows if x["round"] == r and "nodes" in x)
            s = metric_rows[r]["seconds"]
            server = s["aggregate"] + s["apply"] + s["evaluation"] + e.get("checkpoint_seconds", 0.0)
            node = max((n.get("seconds_node", 0.0) for n in e["nodes"]), default=0.0)
            setup = max((n.get("seconds_setup", 0.0) for n in e["nodes"]), default=0.0)
            out.append({"round": r, "engine": e["round_seconds"], "in_process": reference[r - 1], "server": server,
                        "node_handler": node, "node_setup": setup,
                        "flower": e["round_seconds"] - server - node})
        return out

    # rounds where every node trains from one round behind, the last (a generation
    # evaluation) left out; the simulation engine's rounds likewise
    sim_rows = {r["round"]: r for r in sim["rows"]}
    steady = list(range(missed + 2, len(ref["round_seconds"])))
    return {"per_client": per_client, "catch_up": catch_up, "idle_tcp_bytes_per_second": idle,
            "deployment_rounds": timing(dep["engine"], rows, steady, ref["round_seconds"]),
            "simulation_rounds": timing(sim["engine"], sim_rows, sorted(r for r in sim_rows if 0 < r < len(sim_rows) - 1),
                                        ref["round_seconds"])}


def tables(summary: dict) -> str:
    out = []
    pc = summary["per_client"]
    if pc:
        med = {k: _median([x[k] for x in pc]) for k in pc[0] if k not in ("round", "node")}
        out += [f"Bytes per client per round (median of {len(pc)} rounds whose node was one round behind):", "",
                "| direction | in-process (encoded message) | Flower messages | TCP on the SuperNode's connection |",
                "|---|---|---|---|",
                f"| up (ClientUpdate) | {med['upload']:,.0f} | {med['message_up']:,.0f} | {med['tcp_up']:,.0f} |",
                f"| down (GlobalUpdate) | {med['downlink']:,.0f} | {med['message_down']:,.0f} | "
                f"{med['tcp_down']:,.0f} |",
                f"| total | {med['upload'] + med['downlink']:,.0f} | {med['message_up'] + med['message_down']:,.0f} | "
                f"{med['tcp_up'] + med['tcp_down']:,.0f} |", "",
                f"An idle SuperNode's connection (polls, heartbeats): {_median(summary['idle_tcp_bytes_per_second']):,.0f}"
                f" B/s (median of {len(summary['idle_tcp_bytes_per_second'])} node-rounds without a message); the "
                "TCP column includes it for the round's duration.", ""]
    for name in ("deployment_rounds", "simulation_rounds"):
        rows = summary[name]
        if not rows:
            continue
        med = {k: _median([x[k] for x in rows]) for k in rows[0] if k != "round"}
        out += [f"{name.replace('_', ' ')} (median of rounds {[x['round'] for x in rows]}, seconds):", "",
                "| engine round | in-process round | overhead | server work | node handler | of which setup "
                "(imports, model from cache) | Flower (process start, transport, polling) |", "|---|---|---|---|---|---|---|",
                f"| {med['engine']:.1f} | {med['in_process']:.1f} | {med['engine'] - med['in_process']:+.1f} | "
                f"{med['server']:.1f} | {med['node_handler']:.1f} | {med['node_setup']:.1f} | {med['flower']:.1f} |",
                ""]
    c = summary["catch_up"]
    if c:
        out += [f"Catch-up of a node that missed {c['replayed']} rounds (its first message, {c['clients']} client(s)):",
                "", "| what | bytes |", "|---|---|",
                f"| the {c['replayed']} GlobalUpdates | {c['replay_bytes']:,} |",
                f"| its Flower message (the round's announcement included) | {c['message_bytes']:,} |",
                f"| TCP to the node during that round (the app's FAB, {c['fab_bytes']:,} B once per node and run, "
                f"and polls included) | {c['tcp_down']:,} |",
                f"| the model as safetensors ({c['parameters']:,} parameters) | {c['safetensors_bytes']:,} |",
                f"| the model in a Flower message (ArrayRecord) | {c['flower_message_bytes']:,} |", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="ni-subset")
    ap.add_argument("--budget", type=int, default=7800, help="K")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--missed", type=int, default=5, help="rounds node 1 misses before it joins")
    ap.add_argument("--seed", type=int, default=42, help="the first seed tried (see scenario_seed)")
    ap.add_argument("--workdir", help="default: a temporary directory")
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args(argv)
    if args.missed < 1:
        ap.error("--missed must be >= 1")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-flower-"))
    args.num_clients = simulation.load_dataset(config.load(None, {"data": args.data})).num_clients
    args.seed = scenario_seed(args)
    env = environment()
    log(f"workdir {workdir}; {env}")
    sim_cfg = run_config(args, os.path.join(workdir, "simulation"))
    download = model_download(sim_cfg)  # first: seconds, where a failure would waste the runs' minutes
    ref = in_process(run_config(args, os.path.join(workdir, "in-process")), log)
    dep = deployment(run_config(args, os.path.join(workdir, "deployment")), args,
                     os.path.join(workdir, "deployment-federation"), log)
    sim = simulation_engine(config.load(None, {**config.as_dict(sim_cfg), "rounds": 4}),
                            os.path.join(workdir, "simulation-federation"), log)
    summary = summarize(ref, dep, sim, download, args.missed)
    env_after = environment()
    print(tables(summary))
    print(f"load average {env['load_average']} -> {env_after['load_average']} on {env['cores']} cores; "
          f"commit {env['commit']}; deployment run {dep['seconds']:.0f} s, simulation-engine run {sim['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "environment": env, "load_average_after": env_after["load_average"],
                       "summary": summary, "in_process_round_seconds": ref["round_seconds"],
                       "deployment": {k: dep[k] for k in ("engine", "tcp", "seconds")},
                       "simulation_engine": {k: sim[k] for k in ("engine", "seconds")}}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
