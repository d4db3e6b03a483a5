"""Ferret and its baselines across machines on Flower (``flwr``).

- ``server_app`` / ``client_app``: the ServerApp and ClientApp that ``flwr run`` starts
  (pyproject.toml's ``[tool.flwr.app]``), on the simulation engine or the deployment
  engine (a SuperLink and SuperNodes).
- ``strategy``: the server side, a subclass of Flower's ``FedAvg`` driving the
  algorithm's ``ServerRole``; ``node``: the client side, driving its ``ClientRole``.
- ``protocol``: the messages; ``cache``: a node's model between messages (catch-up by
  replaying the GlobalUpdates it missed, proven by its weight digest).
- ``settings``: the run config; ``launcher``: a SuperLink and SuperNodes on 127.0.0.1
  (``ferret-fl flower``).

This package's ``__init__`` imports nothing heavy: a ClientApp process starts per message.
"""
