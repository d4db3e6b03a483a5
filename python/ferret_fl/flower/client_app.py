"""The ClientApp: one handler per message type of ``protocol``.

The deployment engine starts a fresh process for every message, so this module imports
only Flower and the torch-free ``cache``/``protocol``: the query handler answers
without loading torch, and the train and sync handlers import the node code (torch,
transformers: seconds on a small CPU) only when they run.

Node config (``flower-supernode --node-config``): ``partition-id`` and ``num-partitions``
(the node trains the clients c with c % num-partitions == partition-id; the simulation
engine sets both), optional ``cache-dir`` (where the node keeps its model; else the run
config's, else ~/.cache/ferret-fl/flower) and ``device`` (else the run config's).
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from . import cache, protocol

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        partition, partitions = node[protocol.NODE_PARTITION], node[protocol.NODE_PARTITIONS]
    except KeyError:
        raise ValueError("this SuperNode needs --node-config 'partition-id=<p> num-partitions=<n>' (the clients it "
                         "trains are those c with c % n == p)") from None
    if not (isinstance(partition, int) and isinstance(partitions, int) and 0 <= partition < partitions):
        raise ValueError(f"node config partition-id={partition!r} num-partitions={partitions!r}: need ints "
                         "0 <= partition-id < num-partitions")
    return partition, partitions


def _cache_path(context: Context, run_key: str) -> str:
    root = context.node_config.get(protocol.NODE_CACHE_DIR) or context.run_config.get("cache-dir", "")
    return cache.directory(str(root), run_key, _partition(context)[0])


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({protocol.RECORD: ConfigRecord(values)}), reply_to=msg)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Partition and cache state, without torch."""
    partition, partitions = _partition(context)
    state = cache.read_state(_cache_path(context, msg.content[protocol.RECORD][protocol.RUN_KEY]))
    return _reply(msg, {protocol.STATUS: protocol.OK, protocol.PARTITION: partition, protocol.PARTITIONS: partitions,
                        protocol.ROUND: -1 if state is None else state["round"],
                        protocol.DIGEST: "" if state is None else state["digest"]})


def _node_and_catch_up(msg: Message, context: Context):
    from .node import Node
    from .settings import parse

    started = time.perf_counter()
    request = msg.content[protocol.RECORD]
    cfg, _ = parse(context.run_config)
    partition, partitions = _partition(context)
    node = Node(cfg, _cache_path(context, request[protocol.RUN_KEY]), partition, partitions,
                device=context.node_config.get(protocol.NODE_DEVICE) or None)
    setup = time.perf_counter() - started
    status, detail, replayed = node.catch_up(int(request[protocol.TARGET]), int(request[protocol.REPLAY_FROM]),
                                             list(request.get(protocol.REPLAY, [])), str(request[protocol.DIGEST]))
    answer = {protocol.STATUS: status, protocol.DETAIL: detail, protocol.ROUND: node.round,
              protocol.DIGEST: node.digest, protocol.REPLAYED: replayed, protocol.SECONDS_SETUP: setup}
    return node, request, answer, started


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Catch up to the round's starting weights, then train the requested clients."""
    from ..algorithms import Announcement

    node, request, answer, started = _node_and_catch_up(msg, context)
    if answer[protocol.STATUS] == protocol.OK:
        announcement = Announcement.from_config(request)
        answer.update(node.train(announcement, [int(c) for c in request[protocol.CLIENTS]]))
    answer[protocol.SECONDS_NODE] = time.perf_counter() - started
    return _reply(msg, answer)


@app.evaluate()
def sync(msg: Message, context: Context) -> Message:
    """Catch up to the weights the server names (the final ones after the last round)."""
    _, _, answer, started = _node_and_catch_up(msg, context)
    answer[protocol.SECONDS_NODE] = time.perf_counter() - started
    return _reply(msg, answer)
