"""The Flower app driven in-process: the strategy and the ClientApp handlers exchange real
Flower Messages through a loopback Grid (no engine, no sockets), so every algorithm, the
catch-up by replay, refusals and resume are checked in seconds against the in-process
simulation, bit for bit. tests/test_flower_engines.py runs the same app on both engines."""

import json
import os

import pytest
import tomllib
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ferret_fl import checkpoint, config, metrics, simulation  # noqa: E402
from ferret_fl.flower import cache, client_app, protocol, settings  # noqa: E402
from ferret_fl.flower.strategy import FLOWER_FILE, FerretFlowerStrategy  # noqa: E402

TINY = dict(model="llama-tiny-shape", data="synthetic", rounds=3, clients_per_round=4, local_steps=1, batch_size=1,
            grad_accum=1, max_length=384, lr=1e-2, server_lr=1.0, budget=96, kseed_candidates=32, kseed_lr=1e-3,
            eval_samples=2, eval_loss_samples=4, max_new_tokens=2, eval_batch_size=4, seed=42)
QUIET = dict(progress=False, log=lambda s: None)
HANDLERS = {"query": client_app.hello, "train": client_app.train, "evaluate": client_app.sync}


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps run and node ids on every Message it builds; a runtime sets them."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp handler of its node, in this process.

    nodes: {node_id: partition}; ``offline`` nodes are not listed and never answer; ``dead``
    nodes are listed (a SuperLink notices a death after a heartbeat window) and never
    answer; ``tamper(request, reply)`` may replace a reply; replies come back in reverse order.
    """

    def __init__(self, nodes: dict[int, int], run_config: dict, cache_dir: str, tamper=None):
        self.nodes, self.run_config, self.cache_dir, self.tamper = dict(nodes), run_config, cache_dir, tamper
        self.offline: set[int] = set()
        self.dead: set[int] = set()
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.offline]

    def set_run(self, run_id):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline or node in self.dead:
                continue
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config=self.run_config,
                              node_config={"partition-id": self.nodes[node], "num-partitions": 2,
                                           "cache-dir": self.cache_dir})
            reply = HANDLERS[msg.metadata.message_type](msg, context)
            replies.append(self.tamper(msg, reply) if self.tamper else reply)
        return list(reversed(replies))


def _cfg(tmp_path, name, **overrides):
    return config.load(None, {**TINY, "output_dir": str(tmp_path / name), **overrides})


def _app(**overrides):
    return settings.AppSettings(**{"resume": False, "cache_dir": "", "round_timeout": 60.0, "query_timeout": 10.0,
                                   "min_nodes": 2, "connect_timeout": 5.0, **overrides})


def _flower_run(tmp_path, cfg, grid=None, tamper=None, **app):
    grid = grid or LoopbackGrid({11: 0, 22: 1}, settings.as_run_config(cfg), str(tmp_path / "cache"), tamper)
    strategy = FerretFlowerStrategy(cfg, _app(**app), log_fn=lambda s: None)
    if app.get("resume"):
        strategy.restore()
    strategy.start(grid)
    return strategy, grid


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _node_weights(tmp_path, cfg, partition):
    return checkpoint.weights(cache.directory(str(tmp_path / "cache"), settings.run_key(cfg), partition))


EXTRA = {
    "fedit": dict(optimizer="adamw", lr=1e-3),
    "fedpipe": dict(optimizer="adamw", lr=1e-3, fedpipe_adapter_budget=0.05, fedpipe_profiles="64:1,8:0.5"),
}


@pytest.mark.parametrize("algorithm", ["ferret", "fedavg", "fedkseed", "fedit", "fedpipe"])
def test_flower_run_equals_the_in_process_simulation_bit_for_bit(tmp_path, algorithm):
    """Server and both nodes end on the simulation's weights; every metrics row is the
    simulation's but for the timings; replies arrive in reverse order."""
    extra = EXTRA.get(algorithm, {})
    ref = _cfg(tmp_path, "in-process", algorithm=algorithm, rounds=2, **extra)
    rows = simulation.run(ref, **QUIET)
    cfg = _cfg(tmp_path, "flower", algorithm=algorithm, rounds=2, **extra)
    strategy, grid = _flower_run(tmp_path, cfg)
    expected = checkpoint.weights(os.path.join(ref.output_dir, "checkpoint"))
    assert _same(checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint")), expected)
    for partition in (0, 1):
        assert _same(_node_weights(tmp_path, cfg, partition), expected)
    timing = {"seconds", "peak_memory_bytes"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics.read(cfg.output_dir)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in json.loads(json.dumps(rows))]
    assert all(not m.content.array_records for m in grid.sent)  # the weights never travel


def test_a_node_offline_for_rounds_catches_up_by_replay_not_by_download(tmp_path):
    """Partition 1 misses rounds 1 and 2 (its clients sit out), comes back for round 3 with
    its old cache: the train message carries exactly the two missed GlobalUpdates, and
    after the run its weights are the server's bit for bit."""
    cfg = _cfg(tmp_path, "flower", rounds=3)
    grid = LoopbackGrid({11: 0, 22: 1}, settings.as_run_config(cfg), str(tmp_path / "cache"))
    grid.offline = {22}
    strategy = FerretFlowerStrategy(cfg, _app(min_nodes=1), log_fn=lambda s: None)
    real_configure = strategy.configure_train

    def configure(server_round, *args):
        grid.offline = {22} if server_round < 3 else set()
        return real_configure(server_round, *args)

    strategy.configure_train = configure
    strategy.start(grid)
    round3 = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.group_id == "3"
              and m.metadata.dst_node_id == 22]
    assert len(round3) == 1
    request = round3[0].content[protocol.RECORD]
    assert request[protocol.REPLAY_FROM] == 1 and list(request[protocol.REPLAY]) == strategy.downlinks[:2]
    rows = metrics.read(cfg.output_dir)
    assert all(c % 2 == 0 for r in rows[1:3] for c in r["clients"]) and any(c % 2 for c in rows[3]["clients"])
    server = checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint"))
    assert _same(_node_weights(tmp_path, cfg, 1), server) and _same(_node_weights(tmp_path, cfg, 0), server)
    trained = [(r["round"], n["node_id"], n["replayed"], n["replay_bytes"])
               for r in strategy.engine_rows if "nodes" in r for n in r["nodes"]]
    # node 11 applies the previous round's GlobalUpdate each round; node 22 the two it missed at once
    d = [len(b) for b in strategy.downlinks]
    assert trained == [(1, 11, 0, 0), (2, 11, 1, d[0]), (3, 11, 1, d[1]), (3, 22, 2, d[0] + d[1])]


def test_a_node_dead_mid_round_is_left_out_then_rejoins_under_its_id_and_catches_up(tmp_path):
    """Node 22 dies during round 2 while the SuperLink still lists it (its train message
    times out) and comes back under the same node id (node authentication keeps it) for
    round 3: round 2 goes on with node 11's client, node 22 is asked its state again,
    replays rounds 1 and 2 and trains; after the sync every node holds the server's bits."""
    cfg = _cfg(tmp_path, "flower", rounds=3)
    grid = LoopbackGrid({11: 0, 22: 1}, settings.as_run_config(cfg), str(tmp_path / "cache"))
    strategy = FerretFlowerStrategy(cfg, _app(min_nodes=1), log_fn=lambda s: None)
    real_configure = strategy.configure_train

    def configure(server_round, *args):
        grid.dead = {22} if server_round == 2 else set()
        return real_configure(server_round, *args)

    strategy.configure_train = configure
    strategy.start(grid)
    rounds = {r["round"]: r for r in strategy.engine_rows if "nodes" in r}
    assert [(x["node_id"], x["reason"]) for x in rounds[2]["refusals"]] == [(22, "timeout")]
    assert metrics.read(cfg.output_dir)[2]["clients"] == [22]  # round 2 sampled 5, 13, 19 (node 22) and 22
    queried = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queried == [11, 22, 22]
    assert [(n["node_id"], n["replayed"]) for n in rounds[3]["nodes"]] == [(11, 1), (22, 2)]
    server = checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint"))
    assert _same(_node_weights(tmp_path, cfg, 0), server) and _same(_node_weights(tmp_path, cfg, 1), server)


def test_a_round_no_connected_node_can_train_waits_then_names_what_to_start(tmp_path):
    cfg = _cfg(tmp_path, "flower", clients_per_round=0.04)  # one of the 25 clients
    client = simulation.sample_clients(cfg, 1, 25)[0]
    grid = LoopbackGrid({11: 1 - client % 2}, settings.as_run_config(cfg), str(tmp_path / "cache"))
    strategy = FerretFlowerStrategy(cfg, _app(min_nodes=1, connect_timeout=1.0), log_fn=lambda s: None)
    with pytest.raises(RuntimeError, match=rf"round 1: no connected node hosts any of its clients \[{client}\]"):
        strategy.start(grid)
    assert [r["round"] for r in metrics.read(cfg.output_dir)] == [0]


def _flip_a_coefficient_byte(payload: bytes) -> bytes:
    """``payload`` with one bit of its first coefficient flipped (finite still: only its digest tells)."""
    header_len = int.from_bytes(payload[:8], "little")
    begin = json.loads(payload[8:8 + header_len])["coefficients"]["data_offsets"][0]
    out = bytearray(payload)
    out[8 + header_len + begin + 1] ^= 0x40
    return bytes(out)


def test_a_corrupt_upload_and_a_wrong_digest_are_refused_and_the_round_goes_on(tmp_path):
    """Round 2 samples clients 5, 13, 19 (node 22, odd partition) and 22 (node 11). Node 22's
    first upload has a flipped bit (refused by the wire digest), node 11 claims weights it
    does not hold (refused by the weight digest). Round 2 aggregates 13 and 19, both refusals
    are logged, and after the sync both nodes hold the server's bits."""
    def tamper(request, reply):
        if request.metadata.message_type != "train" or request.metadata.group_id != "2":
            return reply
        values = dict(reply.content[protocol.RECORD])
        if request.metadata.dst_node_id == 22:
            values[protocol.UPLOADS] = [_flip_a_coefficient_byte(values[protocol.UPLOADS][0]),
                                        *values[protocol.UPLOADS][1:]]
        else:
            values[protocol.DIGEST] = "xxh3_128:" + "0" * 32
        return Message(RecordDict({protocol.RECORD: ConfigRecord(values)}), reply_to=request)

    cfg = _cfg(tmp_path, "flower", rounds=3)
    sampled = simulation.sample_clients(cfg, 2, 25)
    assert sampled == [5, 13, 19, 22], "the test's story needs this sample; pick another seed if sampling changed"
    _flower_run(tmp_path, cfg, tamper=tamper)
    log = [json.loads(line) for line in open(os.path.join(cfg.output_dir, FLOWER_FILE))]
    round2 = next(r for r in log if r["round"] == 2 and "nodes" in r)
    assert {(r["node_id"], r.get("client_id"), r["reason"]) for r in round2["refusals"]} == \
        {(11, None, "digest"), (22, 5, "digest")}
    row = metrics.read(cfg.output_dir)[2]
    assert row["clients"] == [5, 13, 19]  # as the simulation counts: every upload that arrived, refused ones too
    assert [(x.get("node_id"), x.get("client_id"), x.get("clients"), x["reason"]) for x in row["refusals"]] == \
        [(None, 5, None, "digest"), (11, None, [22], "node-digest")]
    server = checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint"))
    assert _same(_node_weights(tmp_path, cfg, 0), server) and _same(_node_weights(tmp_path, cfg, 1), server)
    assert log[-1]["sync"] and sorted(log[-1]["in_sync"]) == [11, 22]


def test_resume_continues_to_the_uninterrupted_weights(tmp_path):
    cfg = _cfg(tmp_path, "flower", rounds=2)
    _flower_run(tmp_path, cfg)
    full = checkpoint.weights(os.path.join(cfg.output_dir, "checkpoint"))
    part = _cfg(tmp_path, "part", rounds=1)
    _flower_run(tmp_path, part)
    resumed = _cfg(tmp_path, "part", rounds=2)
    strategy, _ = _flower_run(tmp_path, resumed, resume=True)
    assert [r["round"] for r in metrics.read(resumed.output_dir)] == [0, 1, 2]
    assert _same(checkpoint.weights(os.path.join(resumed.output_dir, "checkpoint")), full)
    assert len(strategy.downlinks) == 2 and len(strategy.digests) == 3


def test_node_cache_survives_only_with_matching_weights(tmp_path):
    """A cache whose weights are not what its state says is dropped: the node starts over."""
    from ferret_fl.flower.node import Node

    cfg = _cfg(tmp_path, "x")
    path = str(tmp_path / "node")
    node = Node(cfg, path, 0, 2)
    cache.save(path, node.model, 3, "xxh3_128:" + "1" * 32)
    assert cache.read_state(path)["round"] == 3
    again = Node(cfg, path, 0, 2)
    assert again.round == 0 and again.digest == node.digest
    with pytest.raises(ValueError, match="partition-id"):
        Node(cfg, path, 2, 2)


def test_pyproject_app_config_lists_every_setting_with_its_default():
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        app = tomllib.load(f)["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "ferret_fl.flower.server_app:app",
                                 "clientapp": "ferret_fl.flower.client_app:app"}
    expected = {**settings.APP_DEFAULTS, **settings.as_run_config(config.RunConfig())}
    assert app["config"] == expected, "pyproject's [tool.flwr.app.config] must list every RunConfig field (dashes)"
    cfg, app_settings = settings.parse(app["config"])
    assert cfg == config.RunConfig() and app_settings.min_nodes == 1
    with pytest.raises(ValueError, match="neither"):
        settings.parse({"no-such-setting": 1})


def test_run_key_ignores_what_a_resume_may_change():
    a = config.RunConfig()
    b = config.load(None, {"rounds": 50, "output_dir": "elsewhere"})
    c = config.load(None, {"seed": 7})
    assert settings.run_key(a) == settings.run_key(b) != settings.run_key(c)


def test_cli_prints_a_run_config_that_flower_parses_back(capsys):
    from ferret_fl import cli

    assert cli.main(["flower", "--print-run-config", "--model", "llama-tiny-shape", "--rounds", "7", "--nodes", "3",
                     "--max-grad-norm", "null", "--output-dir", "/srv/ferret/run"]) == 0
    cfg, app = settings.parse(tomllib.loads(capsys.readouterr().out))
    assert cfg == config.load(None, {"model": "llama-tiny-shape", "rounds": 7, "output_dir": "/srv/ferret/run"})
    assert app.min_nodes == 3 and app.cache_dir == "" and not app.resume


def test_readme_flower_commands_use_flags_the_installed_flower_knows():
    """Every --flag the README's "Run across machines" gives flower-superlink,
    flower-supernode, flwr and ferret-fl exists in that command's --help."""
    import re
    import subprocess
    import sys

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        section = f.read().split("## Run across machines", 1)[1].split("\n## ", 1)[0]
    commands = re.sub(r"\\\n\s*", " ", "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)))
    bin_dir = os.path.dirname(sys.executable)
    checked, helps = set(), {}
    for line in commands.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] not in ("flower-superlink", "flower-supernode", "flwr", "ferret-fl"):
            continue
        subcommand = {"flwr": words[1:3] if words[1:2] == ["supernode"] else words[1:2], "ferret-fl": words[1:2]}
        argv = [os.path.join(bin_dir, words[0]), *subcommand.get(words[0], [])]
        if tuple(argv) not in helps:
            helps[tuple(argv)] = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120,
                                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
                                                     "COLUMNS": "200"}).stdout
        help_text = helps[tuple(argv)]
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", line.split("#", 1)[0]):
            assert flag in help_text, f"{' '.join(words[:1] + argv[1:])}: {flag} is not in its --help"
            checked.add((words[0], flag))
    assert {("flower-superlink", "--enable-supernode-auth"), ("flower-supernode", "--auth-supernode-private-key"),
            ("flower-supernode", "--root-certificates"), ("ferret-fl", "--print-run-config")} <= checked
