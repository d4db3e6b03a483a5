"""What the ServerApp and the ClientApp say to each other: one ConfigRecord per message.

Three message types, each answered by one reply:

- ``query`` (hello): the node names its partition (``partition-id`` of ``num-partitions``;
  it trains the clients c with c % num-partitions == partition-id) and the round and
  digest of its cached weights. No torch: it costs a node almost nothing.
- ``train``: the round's announcement (round, seed, lr), the clients to train, and the
  catch-up: ``replay`` holds the encoded GlobalUpdates of rounds ``replay-from`` ..
  round - 1 that the node has not applied (the server's record of the node), ``digest``
  the weights they lead to. The node replays what it lacks, proves the result with its
  digest, trains from it and returns one upload per client.
- ``evaluate`` (sync, after the last round): the same catch-up to the final weights,
  no training; the node answers with its digest, so every node ends on the server's bits.

Every reply carries ``status``: ``ok``; ``resync`` (the node's cache is not where the
server thought: ``round`` says where it is, the server sends from there next time);
``digest-mismatch`` (after replay the node's weights are not the server's: it keeps its
old cache and is sent everything from round 1 next time). Keys are module constants;
only plain ints, floats, strings and bytes travel, never pickles.
"""

from __future__ import annotations

RECORD = "ferret"

# reply statuses
OK, RESYNC, MISMATCH = "ok", "resync", "digest-mismatch"

# keys, server -> node
RUN_KEY = "run-key"
ROUND = "round"
TARGET = "target"  # rounds the node must have applied before it trains / answers
CLIENTS = "clients"
REPLAY_FROM = "replay-from"
REPLAY = "replay"
DIGEST = "digest"
# keys, node -> server
STATUS = "status"
DETAIL = "detail"
PARTITION = "partition-id"
PARTITIONS = "num-partitions"
UPLOADS = "uploads"
CLIENT_IDS = "client-ids"
NUM_SAMPLES = "num-samples"
TRAIN_LOSSES = "train-losses"
SECONDS_LOCAL = "seconds-local"
SECONDS_COMPRESS = "seconds-compress"
REPLAYED = "replayed"  # rounds the node replayed for this message
SECONDS_SETUP = "seconds-setup"  # building the node's model from its cache
SECONDS_NODE = "seconds-node"  # the handler, from the message to the reply (setup, replay, training)

# The SuperNode's node config keys (the simulation engine sets the first two itself).
NODE_PARTITION, NODE_PARTITIONS, NODE_CACHE_DIR, NODE_DEVICE = "partition-id", "num-partitions", "cache-dir", "device"


def message_bytes(message) -> int:
    """Bytes Flower moves for ``message``: its serialized objects (the records, the
    RecordDict and the Message, as pushed and pulled) plus its metadata."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = sum(len(o.deflate()) for o in get_all_nested_objects(message).values())
    return objects + message_to_proto(remove_content_from_message(message)).ByteSize()
