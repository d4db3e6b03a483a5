"""A Flower federation on 127.0.0.1: start it, run the app, check the run, stop it.

``LocalFederation`` starts a SuperLink (the deployment engine with SuperNodes, or the
simulation engine with virtual nodes), each process in its own process group, runs
the app with ``flwr run``, waits for the run with ``flwr ls`` (``flwr run --stream``
exits 0 even when the ServerApp failed, so the status ``finished:completed`` is what
counts), and stops every process it started by its PID (the process group: the
ServerApp and ClientApp children go with their parent), also on failure.

Everything is offline: no telemetry, no update check, no runtime dependency
installation, and ``FLWR_HOME`` in the federation's own directory (``flwr`` keeps its
connection config there and never rewrites this project's pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import protocol
from .settings import toml_lines

ENGINES = ("deployment", "simulation")
# Environment of every Flower process started here: offline and quiet.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "local"
# Seconds a stopped process gets to exit on SIGTERM before SIGKILL.
STOP_GRACE = 10.0
# How often the run's status is polled.
POLL_SECONDS = 2.0
FINISHED_OK = "finished:completed"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out.extend(children)
        todo.extend(children)
    return out


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


def project_dir() -> str:
    """The directory whose pyproject.toml declares the app (``[tool.flwr.app]``): this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        with open(os.path.join(root, "pyproject.toml")) as f:
            if "[tool.flwr.app]" in f.read():
                return root
    except OSError:
        pass
    raise FileNotFoundError(f"no pyproject.toml with [tool.flwr.app] at {root}: run from a checkout of ferret-kernels "
                            "installed with `pip install -e .[flower]`")


def app_run_config(cfg, cache_dir: str, *, min_nodes: int, resume: bool = False, round_timeout: float = 600.0,
                   query_timeout: float = 60.0) -> dict:
    """The run config of the app for ``cfg`` (its output directory made absolute: the
    ServerApp runs elsewhere) with the app's own settings."""
    from .settings import as_run_config

    cfg = dataclasses.replace(cfg, output_dir=os.path.abspath(cfg.output_dir))
    return {**as_run_config(cfg), "resume": resume, "cache-dir": cache_dir, "min-nodes": min_nodes,
            "round-timeout": float(round_timeout), "query-timeout": float(query_timeout)}


def run_local(cfg, *, nodes: int, engine: str, workdir: str, resume: bool = False, round_timeout: float = 600.0,
              timeout: float = 24 * 3600.0, log=print) -> RunOutcome:
    """``cfg`` on a LocalFederation of ``nodes`` nodes: started, run, checked, stopped.
    Node caches live in ``workdir`` (keep it to resume)."""
    with LocalFederation(workdir, nodes, engine, log=log) as fed:
        run_config = app_run_config(cfg, fed.cache_dir, min_nodes=nodes, resume=resume, round_timeout=round_timeout)
        outcome = fed.run_app(run_config, timeout)
        if not outcome.completed:
            log(fed.run_log(outcome.run_id)[-4000:])
    return outcome


@dataclass
class RunOutcome:
    run_id: int
    status: str
    seconds: float
    details: dict = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == FINISHED_OK


class LocalFederation:
    """A SuperLink and ``nodes`` nodes on 127.0.0.1 under ``workdir`` (logs, FLWR_HOME, node caches).

    engine: "deployment" (real SuperNode processes, ``start_node`` / ``kill_node``) or
    "simulation" (the SuperLink's simulation runtime runs ``nodes`` virtual nodes).
    Use as a context manager: leaving it stops every process it started.
    """

    def __init__(self, workdir: str, nodes: int, engine: str = "deployment", log=print):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be an int >= 1; got {nodes!r}")
        self.workdir, self.num_nodes, self.engine, self.log = os.path.abspath(workdir), nodes, engine, log
        self.home = os.path.join(self.workdir, "flwr-home")
        self.cache_dir = os.path.join(self.workdir, "node-cache")
        os.makedirs(self.home, exist_ok=True)
        bin_dir = os.path.dirname(sys.executable)  # the SuperLink finds flower-superexec on PATH
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": self.home,
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self._started: list[subprocess.Popen] = []
        self.pids: list[int] = []  # every process started here, for whoever checks they are gone

    # ---- processes -------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = os.path.join(self.workdir, f"{name}.log")
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                    start_new_session=True)
        self._started.append(proc)
        self.pids.append(proc.pid)
        self.log(f"started {name} (pid {proc.pid}): {shlex.join(argv)}")
        return proc

    def start(self, partitions=None) -> LocalFederation:
        """Start the SuperLink and (deployment) the SuperNodes of ``partitions`` (default: all)."""
        argv = [_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1", "--port",
                str(self.port), "--disable-runtime-dependency-installation"]
        if self.engine == "simulation":
            argv.append("--simulation")
        self.superlink = self._spawn("superlink", argv)
        self._wait_for_port(self.port, self.superlink)
        self._write_connection()
        if self.engine == "deployment":
            for partition in range(self.num_nodes) if partitions is None else partitions:
                self.start_node(partition)
        return self

    def _wait_for_port(self, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}; see {self.workdir}/*.log")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {self.workdir}/*.log")

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"', "insecure = true"]
        with open(os.path.join(self.home, "config.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_node(self, partition: int, superlink: str | None = None) -> subprocess.Popen:
        """Start (or restart) the SuperNode of ``partition`` with its cache directory;
        ``superlink``: the address it connects to (default: the SuperLink's, 127.0.0.1:port)."""
        if self.engine != "deployment":
            raise ValueError("SuperNodes are started only on the deployment engine")
        node_config = (f'{protocol.NODE_PARTITION}={partition} {protocol.NODE_PARTITIONS}={self.num_nodes} '
                       f'{protocol.NODE_CACHE_DIR}="{self.cache_dir}"')
        argv = [_bin("flower-supernode"), "--insecure", "--superlink", superlink or f"127.0.0.1:{self.port}", "--port",
                str(free_port()), "--node-config", node_config]
        proc = self._spawn(f"supernode-{partition}", argv)
        self.supernodes[partition] = proc
        return proc

    def kill_node(self, partition: int) -> None:
        """SIGKILL the SuperNode of ``partition`` and its ClientApp processes (a crash, not a shutdown)."""
        proc = self.supernodes.pop(partition)
        self._signal(proc, signal.SIGKILL)
        proc.wait()
        self.log(f"killed supernode-{partition} (pid {proc.pid})")

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop every process started here and their descendants (Flower detaches some of
        its children into their own sessions): SIGTERM, then SIGKILL after STOP_GRACE."""
        family = {proc.pid: descendants(proc.pid) for proc in self._started}
        for proc in reversed(self._started):
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in reversed(self._started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in reversed(self._started):
            for pid in [proc.pid, *family[proc.pid]]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        self._started.clear()
        self.supernodes.clear()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- runs ------------------------------------------------------------------------

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        return done.stdout

    def submit(self, app_dir: str, run_config: dict) -> int:
        """Start a run of the app in ``app_dir`` with ``run_config`` overrides; its run id."""
        path = os.path.join(self.workdir, f"run-config-{time.monotonic_ns()}.toml")
        with open(path, "w") as f:
            f.write(toml_lines(run_config))
        federation = ["--federation-config", f"num-supernodes={self.num_nodes}"] if self.engine == "simulation" else []
        out = self._flwr("run", os.path.abspath(app_dir), CONNECTION, "--run-config", path, *federation, "--format",
                         "json")
        answer = json.loads(out[out.index("{"):])
        if not answer.get("success"):
            raise RuntimeError(f"flwr run did not start the run: {answer}")
        run_id = int(answer["run-id"])
        self._spawn(f"run-{run_id}", [_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"])
        return run_id

    def status(self, run_id: int) -> dict:
        out = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        answer = json.loads(out[out.index("{"):])
        runs = answer.get("runs") or []
        if not runs:
            raise RuntimeError(f"flwr ls does not know run {run_id}: {answer}")
        return runs[0]

    def wait(self, run_id: int, timeout: float) -> RunOutcome:
        """Poll the run until it finished (or ``timeout`` s: it is stopped and reported as such)."""
        t0 = time.monotonic()
        while True:
            info = self.status(run_id)
            if str(info["status"]).startswith("finished"):
                return RunOutcome(run_id, str(info["status"]), time.monotonic() - t0, info)
            if time.monotonic() - t0 > timeout:
                self._flwr("stop", str(run_id), CONNECTION)
                return RunOutcome(run_id, f"timeout after {timeout:.0f} s ({info['status']})",
                                  time.monotonic() - t0, info)
            time.sleep(POLL_SECONDS)

    def run_app(self, run_config: dict, timeout: float) -> RunOutcome:
        """Run this project's app with ``run_config``; the outcome (check ``completed``)."""
        run_id = self.submit(project_dir(), run_config)
        outcome = self.wait(run_id, timeout)
        self.log(f"run {run_id}: {outcome.status} after {outcome.seconds:.1f} s")
        return outcome

    def run_log(self, run_id: int) -> str:
        """What the run's ServerApp logged (streamed into run-<id>.log)."""
        path = os.path.join(self.workdir, f"run-{run_id}.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()
