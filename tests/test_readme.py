"""The README's Python examples run as written (on a tiny LLaMA)."""

import copy
import os
import re

import torch

from ferret_fl.data import collate, load_synthetic, tokenize_examples
from ferret_fl.models import load_causal_lm

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


class _Received:
    """The server's inbox: the (client_id, payload) the client part of the example produced."""

    def __init__(self, namespace):
        self.namespace = namespace

    def __iter__(self):
        return iter([("client-0", self.namespace["payload"])])


def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    model, tok = load_causal_lm("llama-tiny-shape")
    data = tokenize_examples(load_synthetic().clients[0].examples[:4], tok, 512)
    ns = {"model": model, "data": data, "loader": [collate(data[:2], tok.pad_token_id)],
          "opt": torch.optim.SGD(model.parameters(), lr=1e-3), "r": 1, "server_model": copy.deepcopy(model)}
    ns["received"] = _Received(ns)
    exec(blocks[0], ns)
    server = ns["server_model"].state_dict()
    assert all(torch.equal(v, server[k]) for k, v in model.state_dict().items())
    params = list(model.parameters())
    ns.update(block_sizes=[p.numel() for p in params], counts=[2] * len(params), server_lr=0.5)
    exec(blocks[1], ns)
    assert ns["gamma"].shape == (2 * len(params),)
