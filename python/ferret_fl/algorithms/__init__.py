"""Federated algorithms as server and client roles (``base.ServerRole`` / ``base.ClientRole``).

``ROLES`` maps each algorithm name to its (server class, client class); both are built
from the run config and a model prepared by ``prepare_model``. The in-process simulation
and a Flower ServerApp/ClientApp drive the same classes.
"""

from __future__ import annotations

from .base import Announcement, ClientMessage, ClientRole, ServerRole
from .fedavg import FedAvgClient, FedAvgServer
from .fedit import FedITClient, FedITServer
from .fedkseed import FedKSeedClient, FedKSeedServer
from .fedpipe import FedPipeClient, FedPipeServer
from .fedpt import FedPTClient, FedPTServer
from .ferret import FerretClient, FerretServer

ROLES: dict[str, tuple[type[ServerRole], type[ClientRole]]] = {
    "ferret": (FerretServer, FerretClient),
    "fedavg": (FedAvgServer, FedAvgClient),
    "fedkseed": (FedKSeedServer, FedKSeedClient),
    "fedit": (FedITServer, FedITClient),
    "fedpt": (FedPTServer, FedPTClient),
    "fedpipe": (FedPipeServer, FedPipeClient),
}

__all__ = ["ROLES", "Announcement", "ClientMessage", "ClientRole", "FedAvgClient", "FedAvgServer", "FedITClient",
           "FedITServer", "FedKSeedClient", "FedKSeedServer", "FedPipeClient",
           "FedPipeServer", "FedPTClient", "FedPTServer", "FerretClient",
           "FerretServer", "ServerRole", "build_client", "build_server", "prepare_model"]


def _roles(cfg) -> tuple[type[ServerRole], type[ClientRole]]:
    if cfg.algorithm not in ROLES:
        raise ValueError(f"algorithm must be one of {', '.join(ROLES)}; got {cfg.algorithm!r}")
    return ROLES[cfg.algorithm]


def prepare_model(cfg, model):
    """The model ``cfg.algorithm`` trains, made from the loaded one (FedIT adds LoRA
    adapters, FedPT may cut layers); every peer calls it once on its copy before building a role."""
    return _roles(cfg)[1].prepare_model(cfg, model)


def build_server(cfg, model) -> ServerRole:
    """The server role of ``cfg.algorithm`` over ``model`` (from ``prepare_model``)."""
    return _roles(cfg)[0](cfg, model)


def build_client(cfg, model) -> ClientRole:
    """The client role of ``cfg.algorithm`` over a node's ``model`` (from ``prepare_model``)."""
    return _roles(cfg)[1](cfg, model)
