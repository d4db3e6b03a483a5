"""The Flower app on Flower's engines, on 127.0.0.1 only: the simulation engine with two
virtual nodes, and the deployment engine (a SuperLink and two SuperNode processes) with a
SuperNode killed mid-round and restarted. Every process a test starts is stopped by its
PID (``LocalFederation.stop``) and checked gone, its descendants included.

Timings on 2 shared cores are in the test docstrings; ``tests/test_flower.py`` covers
the same app in-process (every algorithm, resume, refusals) in seconds.
"""

import json
import os
import time

import pytest

pytest.importorskip("flwr")

from test_flower import QUIET, TINY, LoopbackGrid, _app, _same, task_identity  # noqa: E402, F401

from ferret_fl import checkpoint, config, metrics, simulation  # noqa: E402
from ferret_fl.flower import cache, settings  # noqa: E402
from ferret_fl.flower.launcher import LocalFederation, app_run_config, descendants, project_dir  # noqa: E402
from ferret_fl.flower.strategy import FLOWER_FILE, FerretFlowerStrategy  # noqa: E402

pytestmark = pytest.mark.slow

# A round of the tiny model takes 10-30 s on 2 shared cores (a fresh ClientApp process
# per message imports torch and transformers); a live node must never miss it.
ROUND_TIMEOUT = 90.0
# A query needs no torch (2-6 s); a node killed a moment ago is still listed and is asked once.
QUERY_TIMEOUT = 30.0
RUN_TIMEOUT = 600.0
POLL = 0.2
# `flwr ls` takes seconds on a loaded machine: the run's status is read this often.
STATUS_EVERY = 5.0
TIMING = {"seconds", "peak_memory_bytes"}


def _cfg(tmp_path, name, **overrides):
    return config.load(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


class ProcessWatch:
    """Every process started by the federation and every descendant seen while polling."""

    def __init__(self, fed: LocalFederation):
        self.fed, self.seen = fed, set()

    def poll(self) -> None:
        for pid in self.fed.pids:
            self.seen.update(descendants(pid))

    def assert_all_gone(self) -> None:
        alive = [pid for pid in {*self.fed.pids, *self.seen} if _running(pid)]
        assert not alive, f"processes still running after the federation stopped: {alive}"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _rounds_done(cfg) -> int:
    try:
        return metrics.read(cfg.output_dir)[-1]["round"]
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _wait_until(what: str, condition, fed: LocalFederation, run_id: int, watch: ProcessWatch,
                timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    status_at = time.monotonic()
    while not condition():
        watch.poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s\n{fed.run_log(run_id)[-3000:]}")
        if time.monotonic() > status_at + STATUS_EVERY:
            if str(fed.status(run_id)["status"]).startswith("finished"):
                raise AssertionError(f"{what}: the run finished first\n{fed.run_log(run_id)[-3000:]}")
            status_at = time.monotonic()
        time.sleep(POLL)


def _started_at(pid: int) -> float:
    """Seconds since boot when ``pid`` started (/proc/<pid>/stat field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def _written_at(path: str) -> float:
    """When ``path`` was last written, in seconds since boot (the clock of _started_at)."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return os.path.getmtime(path) - (time.time() - uptime)


def _clientapp_since(supernode_pid: int, since: float) -> bool:
    """Whether the SuperNode runs a ClientApp process started after ``since`` (uptime s)."""
    for pid in descendants(supernode_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"flwr-clientapp" in f.read() and _running(pid) and _started_at(pid) >= since:
                    return True
        except FileNotFoundError:
            continue
    return False


def _node_weights(fed: LocalFederation, cfg, partition: int) -> dict:
    return checkpoint.weights(cache.directory(fed.cache_dir, settings.run_key(cfg), partition))


def _without_timing(rows: list[dict], also=()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and k not in also} for r in json.loads(json.dumps(rows))]


def test_simulation_engine_two_nodes_two_rounds_equal_the_in_process_run_bit_for_bit(tmp_path):
    """``flwr run`` on the simulation engine (Ray, 2 virtual nodes): the run finishes
    completed; the server's weights and both nodes' cached weights equal the in-process
    simulation's bit for bit, and so does every metrics row but its timings.
    About 60 s on 2 shared cores (Ray's start-up dominates)."""
    ref = _cfg(tmp_path, "in-process", rounds=2)
    rows = simulation.run(ref, **QUIET)
    cfg = _cfg(tmp_path, "engine", rounds=2)
    fed = LocalFederation(str(tmp_path / "federation"), 2, "simulation", log=lambda s: None)
    watch = ProcessWatch(fed)
    with fed:
        outcome = fed.run_app(app_run_config(cfg, fed.cache_dir, min_nodes=2, round_timeout=ROUND_TIMEOUT,
                                             query_timeout=QUERY_TIMEOUT), RUN_TIMEOUT)
        watch.poll()
        run_log = fed.run_log(outcome.run_id)
    watch.assert_all_gone()
    assert outcome.completed, run_log[-3000:]
    expected = checkpoint.weights(os.path.join(ref.output_dir, "checkpoint"))
    assert _same(checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint")), expected)
    for partition in (0, 1):
        assert _same(_node_weights(fed, cfg, partition), expected)
    assert _without_timing(metrics.read(cfg.output_dir)) == _without_timing(rows)


def test_deployment_engine_a_supernode_killed_mid_round_rejoins_and_catches_up_bit_for_bit(tmp_path):
    """A SuperLink and two SuperNodes; 3 rounds. SuperNode 1 is SIGKILLed (with its
    ClientApp) while its round-2 ClientApp runs, and restarted at once (a new node id).
    Round 2 completes with node 0's client once the SuperLink reports the dead node (its
    heartbeat window, about 60 s) or round-timeout passes; the restarted SuperNode answers
    its query in round 3, replays what it missed and trains. The run finishes completed, every node
    holds the server's final weights, and those equal the in-process run of the same
    fault (the loopback grid with partition 1 silent in round 2) bit for bit.
    About 3 minutes on 2 shared cores (round 2 waits ROUND_TIMEOUT for the dead node)."""
    cfg = _cfg(tmp_path, "engine", rounds=3)
    fed = LocalFederation(str(tmp_path / "federation"), 2, "deployment", log=lambda s: None)
    watch = ProcessWatch(fed)
    with fed:
        run_id = fed.submit(project_dir(), app_run_config(cfg, fed.cache_dir, min_nodes=2,
                                                          round_timeout=ROUND_TIMEOUT, query_timeout=QUERY_TIMEOUT))
        _wait_until("round 1 done", lambda: _rounds_done(cfg) >= 1, fed, run_id, watch)
        round2_began = _written_at(metrics.path(cfg.output_dir)) - 0.1  # round 1's row, then round 2's messages
        killed = fed.supernodes[1].pid
        _wait_until("node 1's round-2 ClientApp running", lambda: _clientapp_since(killed, round2_began), fed, run_id,
                    watch)
        watch.poll()
        fed.kill_node(1)
        fed.start_node(1)  # registers while round 2 still waits for the dead node
        _wait_until("round 2 done", lambda: _rounds_done(cfg) >= 2, fed, run_id, watch)
        outcome = fed.wait(run_id, RUN_TIMEOUT)
        watch.poll()
        run_log = fed.run_log(run_id)
    watch.assert_all_gone()
    assert outcome.completed, run_log[-3000:]

    log = [json.loads(line) for line in open(os.path.join(cfg.output_dir, FLOWER_FILE))]
    rounds = {r["round"]: r for r in log if "nodes" in r}
    sampled2 = simulation.sample_clients(cfg, 2, 25)
    # the SuperLink reports the node gone after its heartbeat window (about 60 s), unless
    # round-timeout comes first
    assert [x["reason"] for x in rounds[2]["refusals"]] in (["error"], ["timeout"]), rounds[2]
    row2 = metrics.read(cfg.output_dir)[2]
    assert row2["clients"] == [c for c in sampled2 if c % 2 == 0]
    assert [x["clients"] for x in row2["refusals"]] == [[c for c in sampled2 if c % 2]]
    dead = rounds[2]["refusals"][0]["node_id"]
    round3 = {n["node_id"]: n for n in rounds[3]["nodes"]}
    assert dead not in round3 and len(round3) == 2 and all(n["replayed"] >= 1 for n in round3.values())
    assert log[-1]["sync"] and set(log[-1]["in_sync"]) >= set(round3) - {dead}

    server = checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint"))
    for partition in (0, 1):
        assert _same(_node_weights(fed, cfg, partition), server)

    same_fault = _cfg(tmp_path, "in-process", rounds=3)
    grid = LoopbackGrid({11: 0, 22: 1}, settings.as_run_config(same_fault), str(tmp_path / "loopback-cache"))
    strategy = FerretFlowerStrategy(same_fault, _app(min_nodes=1), log_fn=lambda s: None)
    configure = strategy.configure_train

    def partition_1_dies_in_round_2(server_round, *args):
        grid.dead = {22} if server_round == 2 else set()
        return configure(server_round, *args)

    strategy.configure_train = partition_1_dies_in_round_2
    strategy.start(grid)
    assert _same(checkpoint.weights(os.path.join(same_fault.output_dir, "checkpoint")), server)
    # the same rows but for timings and the node ids and timeouts named in the refusals
    assert _without_timing(metrics.read(same_fault.output_dir), also={"refusals"}) == \
        _without_timing(metrics.read(cfg.output_dir), also={"refusals"})
