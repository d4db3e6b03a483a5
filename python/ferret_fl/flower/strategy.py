"""The server side of the Flower app: one strategy that drives any algorithm's ServerRole.

``FerretFlowerStrategy`` subclasses Flower's ``FedAvg`` and keeps, for the whole run:
the server role (Ferret's holds the run's one ``Aggregator``), the server's copy of the
model, every encoded GlobalUpdate (``downlinks``, also on disk), the digest of the
weights after each round (``digests``), and what it knows of each node: its partition
and the last round it reached (``nodes``).

A round, as the simulation runs it (``simulation.run``), over Flower messages:

- ``configure_train``: new nodes are asked their partition and cache (a ``query``
  message); the round's clients are sampled exactly as the simulation samples them
  (``simulation.sample_clients``) and each goes to the node hosting its partition, with
  the GlobalUpdates that node has not applied (catch-up by replay, never the model).
- ``aggregate_train``: replies are matched to the messages they answer (a node's death
  is reported by the SuperLink, from another source id); a reply whose status, digest
  or fields are wrong is refused and logged, as is an upload the server role refuses;
  the others are aggregated in client order, so the order replies arrive in does not
  matter. The server applies the downlink, records the digest, evaluates, writes the
  metrics row (``metrics.py``, the simulation's schema) and checkpoints.
- ``configure_evaluate`` / ``aggregate_evaluate`` (after the last round): every node
  catches up to the final weights and proves it with its digest.

A node that does not answer within round-timeout is left out of the round; while the
SuperLink lists it, it is asked its state again (query-timeout) before its next round,
so a SuperNode that restarts (a new node id, or the same one under node authentication)
rejoins and catches up on its first message. A dead node drops off the SuperLink's list
after its heartbeat window (about a minute).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from .. import attacks, checkpoint, metrics
from ..algorithms import build_server
from ..config import RunConfig, as_dict
from ..simulation import (
    Evaluator,
    _check_resumable,
    check_divergence,
    describe,
    evaluate_round,
    load_dataset,
    peak_memory_bytes,
    quality,
    sample_clients,
)
from . import protocol
from .peer import build_model, weights_digest
from .settings import AppSettings, run_key

# Per-round engine records (bytes each node sent and received, catch-up, refusals).
FLOWER_FILE = "flower.jsonl"
DOWNLINKS_DIR = "downlinks"
# How often the server looks for nodes while it waits for min-nodes.
POLL_SECONDS = 1.0


@dataclass
class NodeRecord:
    """What the server knows of a node: its partition and the rounds it has applied."""

    partition: int
    partitions: int
    round: int  # rounds applied; the weights its next round starts from are digests[round]
    since: float  # when it answered its query (the newest node of a partition is its host)


def _downlink_path(output_dir: str, round_index: int) -> str:
    return os.path.join(output_dir, DOWNLINKS_DIR, f"round-{round_index:06d}.bin")


class FerretFlowerStrategy(FedAvg):
    """Any ferret-fl algorithm (``cfg.algorithm``) on Flower's Message API; see the module docstring."""

    def __init__(self, cfg: RunConfig, app: AppSettings, *, log_fn: Callable[[str], None] | None = None):
        super().__init__(fraction_train=cfg.clients_per_round if cfg.clients_per_round <= 1 else 1.0,
                         fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=app.min_nodes, weighted_by_key=protocol.NUM_SAMPLES)
        self.cfg, self.app = cfg.validate(), app
        self.say = log_fn or (lambda text: log(INFO, text))
        self.run_key = run_key(cfg)
        self.dataset = load_dataset(cfg)
        self.model, tokenizer = build_model(cfg)
        self.server = build_server(cfg, self.model)
        self.evaluator = Evaluator(cfg, self.dataset, tokenizer)
        self.downlinks: list[bytes] = []
        self.digests: list[str] = [weights_digest(self.model)]
        self.nodes: dict[int, NodeRecord] = {}
        self.rejected: set[int] = set()  # nodes whose num-partitions differs from the others'
        self.rows: list[dict] = []
        self.engine_rows: list[dict] = []
        self._messages: list[Message] = []
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoint")
        os.makedirs(os.path.join(cfg.output_dir, DOWNLINKS_DIR), exist_ok=True)

    # ---- run state -------------------------------------------------------------------

    def restore(self) -> bool:
        """Continue the checkpointed run in ``output_dir`` (False: there is none)."""
        if not checkpoint.exists(self.ckpt_dir):
            return False
        _check_resumable(self.ckpt_dir, self.cfg)
        tensors, state = checkpoint.load(self.ckpt_dir, self.model)
        self.server.load_state_dict(tensors)
        done = int(state["round"])
        digests = state.get("digests")
        if not isinstance(digests, list) or len(digests) != done + 1:
            raise ValueError(f"{self.ckpt_dir} was not written by the Flower app (no digest per round): resume it "
                             "with `ferret-fl run --resume`, or start afresh in a new output-dir")
        if digests[-1] != weights_digest(self.model):
            raise ValueError(f"{self.ckpt_dir}: the weights do not match the digest recorded for round {done}")
        downlinks = []
        for r in range(1, done + 1):
            with open(_downlink_path(self.cfg.output_dir, r), "rb") as f:
                downlinks.append(f.read())
        self.digests, self.downlinks = digests, downlinks
        self.rows = metrics.read(self.cfg.output_dir, done)
        self.engine_rows = [r for r in self._read_engine_rows() if r["round"] <= done]
        self.say(f"resuming {self.cfg.algorithm} after round {done} from {self.ckpt_dir}")
        return True

    def _read_engine_rows(self) -> list[dict]:
        path = os.path.join(self.cfg.output_dir, FLOWER_FILE)
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _write_engine_rows(self) -> None:
        path = os.path.join(self.cfg.output_dir, FLOWER_FILE)
        checkpoint.write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.engine_rows).encode())

    # ---- nodes -----------------------------------------------------------------------

    def _message(self, node_id: int, message_type: str, values: dict, group: int, ttl: float | None = None) -> Message:
        values = {protocol.RUN_KEY: self.run_key, **values}
        return Message(RecordDict({protocol.RECORD: ConfigRecord(values)}), dst_node_id=node_id,
                       message_type=message_type, group_id=str(group), ttl=ttl or self.app.round_timeout)

    def refresh_nodes(self, grid: Grid) -> None:
        """Forget nodes the SuperLink no longer lists; ask the others the server does not
        know (new ones, and those that failed a message: a SuperNode restarted under the
        same key keeps its node id) their partition and cache, within query-timeout."""
        listed = set(grid.get_node_ids())
        for gone in set(self.nodes) - listed:
            del self.nodes[gone]
        self.rejected &= listed
        new = sorted(listed - set(self.nodes) - self.rejected)
        if not new:
            return
        queries = [self._message(n, MessageType.QUERY, {}, 0, ttl=self.app.query_timeout) for n in new]
        replies = grid.send_and_receive(queries, timeout=self.app.query_timeout)
        sent = {q.metadata.message_id: q.metadata.dst_node_id for q in queries}
        answered = set()
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            answered.add(node)
            if reply.has_error():
                self.say(f"node {node} did not answer its query: {reply.error.reason}")
                continue
            try:
                self._register(node, reply.content[protocol.RECORD])
            except (KeyError, TypeError, ValueError) as exc:
                self.say(f"node {node} answered its query with a malformed record ({exc!r}): asked again next round")
        for node in set(new) - answered:
            self.say(f"node {node} did not answer its query within query-timeout={self.app.query_timeout:g} s: "
                     "asked again next round while the SuperLink lists it")

    def _register(self, node: int, hello: ConfigRecord) -> None:
        partition, partitions = int(hello[protocol.PARTITION]), int(hello[protocol.PARTITIONS])
        known = {r.partitions for r in self.nodes.values()}
        if not 0 <= partition < partitions:
            self.say(f"node {node} says partition-id={partition} of num-partitions={partitions}: left out")
            self.rejected.add(node)
            return
        if known and partitions not in known:
            self.say(f"node {node} says num-partitions={partitions} but the other nodes say {sorted(known)}: left out")
            self.rejected.add(node)
            return
        cached, digest = int(hello[protocol.ROUND]), str(hello[protocol.DIGEST])
        # a cache the server can vouch for is replayed from; anything else starts over from round 1
        applied = cached if 0 <= cached < len(self.digests) and self.digests[cached] == digest else 0
        self.nodes[node] = NodeRecord(partition, partitions, applied, time.monotonic())
        cache = ("no cache" if cached < 0 else f"cache at round {cached}"
                 + ("" if applied == cached else " (not weights of this run: it replays from round 1)"))
        self.say(f"node {node}: partition {partition} of {partitions}, {cache}")

    def wait_for_nodes(self, grid: Grid) -> None:
        """Block until min-nodes nodes answered (connect-timeout, then RuntimeError)."""
        deadline = time.monotonic() + self.app.connect_timeout
        while True:
            self.refresh_nodes(grid)
            if len(self.nodes) >= self.app.min_nodes:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.nodes)} nodes answered within connect-timeout="
                                   f"{self.app.connect_timeout:g} s; min-nodes={self.app.min_nodes}: start more "
                                   "SuperNodes or lower min-nodes")
            time.sleep(POLL_SECONDS)

    def host(self, client: int) -> int | None:
        """The node training ``client``: the newest node of its partition."""
        hosts = [(r.since, n) for n, r in self.nodes.items() if client % r.partitions == r.partition]
        return max(hosts)[1] if hosts else None

    def _forget(self, node: int) -> None:
        """After a failed message: the node is asked its state again before its next one."""
        self.nodes.pop(node, None)

    def _catch_up(self, node: int, target: int) -> dict:
        start = self.nodes[node].round + 1
        return {protocol.TARGET: target, protocol.REPLAY_FROM: start, protocol.REPLAY: self.downlinks[start - 1:target],
                protocol.DIGEST: self.digests[target]}

    # ---- Flower's strategy hooks -------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's clients (sampled as the simulation samples them), one message per
        hosting node. When no connected node hosts any of them, it waits for one
        (connect-timeout, then RuntimeError): a round without an upload cannot advance."""
        announcement = self.server.announce(server_round)
        self._sampled = sample_clients(self.cfg, server_round, self.dataset.num_clients)
        deadline = time.monotonic() + self.app.connect_timeout
        while True:
            self.refresh_nodes(grid)
            by_node: dict[int, list[int]] = {}
            self._unhosted = []
            for c in self._sampled:
                node = self.host(c)
                if node is None:
                    self._unhosted.append(c)
                else:
                    by_node.setdefault(node, []).append(c)
            if by_node:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {server_round}: no connected node hosts any of its clients {self._sampled} "
                                   f"within connect-timeout={self.app.connect_timeout:g} s; the checkpoint holds round "
                                   f"{server_round - 1}: start the SuperNodes of their partitions and resume")
            time.sleep(POLL_SECONDS)
        if self._unhosted:
            self.say(f"round {server_round}: no connected node hosts clients {self._unhosted}: they sit this round out")
        self._messages = [self._message(node, MessageType.TRAIN, {**announcement.as_config(), protocol.CLIENTS: clients,
                                                                  **self._catch_up(node, server_round - 1)},
                                        server_round)
                          for node, clients in sorted(by_node.items())]
        self._assignment = dict(sorted(by_node.items()))
        self._traffic = {m.metadata.dst_node_id: {"bytes_to_node": protocol.message_bytes(m),
                                                  "replay_bytes": sum(len(b) for b in m.content[protocol.RECORD][
                                                      protocol.REPLAY])} for m in self._messages}
        return self._messages

    def _map_replies(self, replies: Iterable[Message]) -> tuple[dict[int, Message], set[int]]:
        """{node: reply} for the messages of ``self._messages``, and the nodes that did not answer."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._messages}
        got: dict[int, Message] = {}
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id)
            if node is not None:
                got[node] = reply
        return got, set(sent.values()) - set(got)

    def _check_reply(self, node: int, reply: Message, target: int, refusals: list[dict]) -> ConfigRecord | None:
        """The reply's record if the node is at the round's weights; else None, with the
        refusal logged and the server's record of the node corrected."""
        def refuse(reason: str, detail: str) -> None:
            refusals.append({"round": target + 1, "node_id": node, "reason": reason, "detail": detail})
            self.say(f"round {target + 1}: node {node} refused ({reason}): {detail}")

        if reply.has_error():
            # from another source id the SuperLink reports the node gone; from the node, its ClientApp failed
            source = "the node" if reply.metadata.src_node_id == node else "the SuperLink"
            refuse("error", f"{source}: {reply.error.reason} (code {reply.error.code})")
            self._forget(node)
            return None
        try:
            answer = reply.content[protocol.RECORD]
            status, cached, digest = str(answer[protocol.STATUS]), int(answer[protocol.ROUND]), str(answer[protocol.DIGEST])
        except (KeyError, TypeError, ValueError) as exc:
            refuse("malformed", f"the reply lacks {exc}")
            self._forget(node)
            return None
        record = self.nodes.get(node)
        if status == protocol.RESYNC:
            refuse("resync", str(answer.get(protocol.DETAIL, "")))
            if record is not None:
                record.round = cached if 0 <= cached <= target else 0
            return None
        if status != protocol.OK or cached != target or digest != self.digests[target]:
            what = answer.get(protocol.DETAIL, "") or f"status {status!r}, round {cached}, digest {digest}"
            refuse("digest", f"{what}; the server's weights after round {target} are {self.digests[target]}")
            if record is not None:
                record.round = 0  # next time it rebuilds from the initial weights and replays every round
            return None
        if record is not None:
            record.round = target
        return answer

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the uploads (client order), apply, evaluate, record, checkpoint."""
        r, target = server_round, server_round - 1
        refusals: list[dict] = []
        got, missing = self._map_replies(replies)
        for node in sorted(missing):
            refusals.append({"round": r, "node_id": node, "reason": "timeout",
                             "detail": f"no reply within round-timeout={self.app.round_timeout:g} s"})
            self.say(f"round {r}: node {node} did not answer within {self.app.round_timeout:g} s: the round goes on "
                     "without it")
            self._forget(node)
        uploads: dict[int, tuple[bytes, float]] = {}
        seconds = dict.fromkeys(metrics.PHASES, 0.0)
        traffic = []
        for node, reply in sorted(got.items()):
            entry = {"node_id": node, "clients": self._assignment[node], **self._traffic[node],
                     "bytes_from_node": protocol.message_bytes(reply)}
            answer = self._check_reply(node, reply, target, refusals)
            if answer is None:
                traffic.append(entry)
                continue
            entry["replayed"] = int(answer.get(protocol.REPLAYED, 0))
            for key in (protocol.SECONDS_SETUP, protocol.SECONDS_NODE):
                if key in answer:
                    entry[key.replace("-", "_")] = float(answer[key])
            traffic.append(entry)
            try:
                rows = list(zip(answer[protocol.CLIENT_IDS], answer[protocol.UPLOADS], answer[protocol.TRAIN_LOSSES],
                                strict=True))
            except (KeyError, ValueError) as exc:
                refusals.append({"round": r, "node_id": node, "reason": "malformed", "detail": str(exc)})
                continue
            for client, payload, loss in rows:
                if client not in self._assignment[node] or client in uploads:
                    refusals.append({"round": r, "node_id": node, "client_id": client, "reason": "client",
                                     "detail": f"client {client} was not asked of node {node} this round"})
                    continue
                uploads[int(client)] = (bytes(payload), float(loss))
            seconds["local"] += float(answer.get(protocol.SECONDS_LOCAL, 0.0))
            seconds["compress"] += float(answer.get(protocol.SECONDS_COMPRESS, 0.0))
        clients = sorted(uploads)
        t = time.perf_counter()
        try:
            downlink = self.server.aggregate(r, [uploads[c][0] for c in clients], client_ids=clients,
                                             skip_refused=True)
        except ValueError as exc:
            self._write_round_log(r, traffic, refusals + self.server.refusals)
            raise RuntimeError(f"round {r}: no upload to aggregate ({exc}); the checkpoint holds round {r - 1}: "
                               "resume when nodes are back (resume=true)") from exc
        seconds["aggregate"] = time.perf_counter() - t
        hosts = {c: node for node, assigned in self._assignment.items() for c in assigned}
        for refused in self.server.refusals:
            refused["node_id"] = hosts[refused["client_id"]]
            self.say(f"round {r}: client {refused['client_id']} of node {refused['node_id']} refused "
                     f"({refused['reason']}): {refused['detail']}")
        t = time.perf_counter()
        self.server.apply_(self.model, downlink, r)
        seconds["apply"] = time.perf_counter() - t
        self.digests.append(weights_digest(self.model))
        self.downlinks.append(downlink)
        checkpoint.write_bytes(_downlink_path(self.cfg.output_dir, r), downlink)
        t = time.perf_counter()
        loss, result = evaluate_round(self.cfg, self.evaluator, self.model, r)
        seconds["evaluation"] = time.perf_counter() - t
        # the simulation's row: the uploads that arrived (refused ones included, as it counts
        # them), then what the engine adds: nodes whose replies were refused or never came
        row = metrics.round_row(r, self.cfg.algorithm, clients=clients, train_losses=[uploads[c][1] for c in clients],
                                eval_loss=loss, upload_sizes=[len(uploads[c][0]) for c in clients],
                                downlink_size=len(downlink), previous=self.rows[-1], seconds=seconds,
                                peak_memory_bytes=peak_memory_bytes(self.cfg.device), quality=quality(result))
        byzantine = attacks.attackers(self.cfg.seed, r, self._sampled, self.cfg.byzantine_fraction)
        if byzantine:
            row["byzantine"] = sorted(byzantine)
        row_refusals = [{k: v for k, v in x.items() if k not in ("round", "node_id")} for x in self.server.refusals]
        row_refusals += [{"node_id": x["node_id"], "clients": self._assignment.get(x["node_id"], []),
                          "reason": f"node-{x['reason']}", "detail": x["detail"]} for x in refusals]
        if row_refusals:
            row["refusals"] = row_refusals
        self.rows.append(row)
        metrics.write(self.cfg.output_dir, self.rows)
        self.say(f"round {r}: train loss {row['train_loss']:.4f}, {describe(row)}, clients {clients}"
                 + (f", refused {len(row_refusals)} ({', '.join(x['reason'] for x in row_refusals)})"
                    if row_refusals else "")
                 + f", up {row['bytes_up']:,} B, down {row['bytes_down']:,} B")
        self._write_round_log(r, traffic, refusals + self.server.refusals)
        check_divergence(self.cfg, self.rows[:-1], row)
        t = time.perf_counter()
        checkpoint.save(self.ckpt_dir, self.model, self.server.state_dict(),
                        {"round": r, "config": as_dict(self.cfg), "digests": self.digests})
        self.engine_rows[-1]["checkpoint_seconds"] = time.perf_counter() - t
        accepted = len(clients) - len(self.server.refusals)
        return None, MetricRecord({"train-loss": row["train_loss"], "eval-loss": row["eval_loss"],
                                   "clients": accepted, "refused": len(row_refusals)})

    def _write_round_log(self, r: int, traffic: list[dict], refusals: list[dict]) -> None:
        self.engine_rows = [x for x in self.engine_rows if x["round"] != r]
        self.engine_rows.append({"round": r, "nodes": traffic, "refusals": refusals, "unhosted": self._unhosted,
                                 "digest": self.digests[-1] if len(self.digests) > r else None})
        self._write_engine_rows()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """After the last round: every node catches up to the final weights."""
        if server_round != self.cfg.rounds:
            return []
        self.refresh_nodes(grid)
        self._messages = [self._message(n, MessageType.EVALUATE, self._catch_up(n, server_round), server_round)
                          for n in sorted(self.nodes) if self.nodes[n].round != server_round]
        return self._messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """How many nodes proved the final weights; the others are logged (and resent from round 1 next time)."""
        got, missing = self._map_replies(replies)
        refusals: list[dict] = []
        in_sync = []
        for node in sorted(missing):
            self.say(f"sync: node {node} did not answer within {self.app.round_timeout:g} s")
            self._forget(node)
        for node, reply in sorted(got.items()):
            if self._check_reply(node, reply, server_round, refusals) is not None:
                in_sync.append(node)
        self.say(f"sync after round {server_round}: {len(in_sync)} of {len(got) + len(missing)} nodes hold the final "
                 f"weights (digest {self.digests[server_round]})")
        self.engine_rows.append({"round": server_round, "sync": True, "in_sync": in_sync, "refusals": refusals,
                                 "missing": sorted(missing), "digest": self.digests[server_round]})
        self._write_engine_rows()
        return MetricRecord({"nodes-in-sync": len(in_sync), "nodes": len(got) + len(missing)})

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Run (or, after ``restore``, continue) the rounds up to ``cfg.rounds``, then sync the nodes.

        Flower's ``start`` always begins at round 1 and ships arrays; here the round comes
        from the server role (a resumed run continues) and the weights never travel."""
        rounds = self.cfg.rounds if num_rounds is None else num_rounds
        timeout = self.app.round_timeout if timeout is None else timeout
        result = Result()
        if not self.rows:
            t = time.perf_counter()
            loss, evaluated = evaluate_round(self.cfg, self.evaluator, self.model, 0)
            self.rows = [metrics.initial_row(self.cfg.algorithm, loss, quality(evaluated), time.perf_counter() - t)]
            metrics.write(self.cfg.output_dir, self.rows)
            self.say(f"round 0: {describe(self.rows[0])}")
        self.wait_for_nodes(grid)
        for r in range(self.server.round, rounds + 1):
            t = time.perf_counter()
            messages = list(self.configure_train(r, ArrayRecord(), train_config or ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=timeout)
            _, result.train_metrics_clientapp[r] = self.aggregate_train(r, replies)
            self.engine_rows[-1]["round_seconds"] = time.perf_counter() - t
            self._write_engine_rows()
        for _ in range(2):  # a node refused at the first sync is sent every round again
            messages = list(self.configure_evaluate(rounds, ArrayRecord(), evaluate_config or ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=timeout)
            synced = self.aggregate_evaluate(rounds, replies)
            result.evaluate_metrics_clientapp[rounds] = synced
            if synced["nodes-in-sync"] == synced["nodes"]:
                break
        return result
