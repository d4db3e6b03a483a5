"""FedPT (Gao et al., arXiv 2410.00362): federated proxy-tuning of a large model through a small one.

One round, with w_r the small model's global weights on every peer:

    clients   tune the small model from w_r with Ferret (or FedAvg: ``fedpt_inner``) and upload
    server    merges the uploads as that algorithm does -> tuned = w_r + federated step
              proxy = large + alpha * (tuned - base)          (``proxy.ProxyTunedLM``, logits only)
              distils the proxy into the small model on its own prompts (KL on the proxy's
              next-token distribution) -> w_{r+1}
    everyone  replays the round's one downlink: w_r -> w_{r+1}, bit for bit

Design decisions (the paper leaves them to the implementation):

* base, the anti-expert, is the small model as every peer starts it (round 0) moved by
  every distillation the server kept, and never by a federated step. The offset
  tuned - base is then exactly the federated tuning so far (proxy-tuning's expert minus
  anti-expert): with w_{r+1} = w_r + F_r + D_r (federated step, then distillation) and
  base_{r+1} = base_r + D_r, tuned_r - base_r = F_1 + ... + F_r. An anti-expert fixed at
  round 0 would also carry what distillation moved into the small model, the
  large-minus-small gap the large model's own logits already hold, and count it again
  each round. base is server state (``state_dict`` holds its trainable tensors).
* The distillation's change travels in the inner algorithm's own downlink, and the
  distillation optimises exactly what that downlink can carry, so what the server
  measures is what every client gets. With Ferret the server optimises K coefficients of
  a fresh seed's random bases (w = tuned - V^T c, Adam on c, gradients projected with
  ``project_blocks``, steps applied with ``reconstruct_blocks_``) and appends them to
  the round's ``GlobalUpdate`` as a second seed: the downlink stays one Ferret wire
  message of two K-coefficient groups (kilobytes), replayed in one launch. With FedAvg
  the distillation is Adam on the weights and the downlink the full update, as FedAvg's is.
* The server keeps the distillation only if it lowered the KL of the replayed model on its
  distillation set; otherwise the round's downlink is the inner algorithm's alone
  (``distillation.kept`` in the metrics says which).
* Server-side data: the Alpaca prompts (instruction + input, never the response) of
  ``fedpt_distill_prompts`` training examples drawn with a fixed seed, continued by the
  proxy's own greedy decoding (``fedpt_distill_tokens``): sequence-level KD on the proxy's
  outputs. No held-out task and no reference answer is used. A deployment whose server
  may not see clients' prompts substitutes a public prompt set of the same kind.
* The large model is used only through its logits, so it may be a black box (see
  ``proxy.py``); its tokenizer must equal the small model's, checked when the server is
  built (``large_model``), before the large weights are loaded.
* The offline pair: the embedded SmolLM2-135M (30 layers) is the large model, the small
  one keeps its first and last ``fedpt_small_layers // 2`` decoder layers (6: 3 + 3, 49.6 M
  of 134.5 M parameters; the embeddings dominate). Keeping both ends was measured on 13
  held-out NI examples: held-out loss 13.19 for first 3 + last 3 layers, 21.82 for the
  first 6, 4.16 for the whole model; the small model shares the tokenizer by construction.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch

from ferret_kernels import functional, wire
from ferret_kernels.messages import GlobalUpdate

from ..proxy import ProxyTunedLM, check_same_tokenizer
from .base import ClientRole, ServerRole, derived_seed, encode_tensors, trainable
from .fedavg import FedAvgClient, FedAvgServer, _global_expected
from .ferret import FerretClient, FerretServer

INNER = {"ferret": (FerretServer, FerretClient), "fedavg": (FedAvgServer, FedAvgClient)}
# Adam's moment decay on the distillation parameters: torch's defaults.
ADAM_BETAS = (0.9, 0.999)
# Key prefix of the anti-expert's tensors in the server state; no inner server's key starts so.
BASE_PREFIX = "fedpt_base/"


def kept_layers(total: int, keep: int) -> list[int]:
    """Indices of the decoder layers a ``keep``-layer small model takes from a ``total``-layer
    one: the first ceil(keep / 2) and the last floor(keep / 2)."""
    if not 1 <= keep < total:
        raise ValueError(f"fedpt_small_layers must be in [1, {total - 1}] for a {total}-layer model (0: use the model "
                         f"as loaded); got {keep}")
    first = (keep + 1) // 2
    return list(range(first)) + list(range(total - (keep - first), total))


def truncate_layers(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """A copy of a decoder-only causal LM (``model.model.layers``, LLaMA-style) with ``keep``
    of its decoder layers (``kept_layers``); embeddings, final norm and head are shared
    copies, so the small model reads and writes the same vocabulary."""
    inner = getattr(model, "model", None)
    if not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        raise ValueError(f"fedpt_small_layers needs a decoder-only model with .model.layers (LLaMA, SmolLM2, Qwen, ...); "
                         f"got {type(model).__name__}: set fedpt_small_layers=0 and give --model a small model")
    small = copy.deepcopy(model)
    indices = kept_layers(len(small.model.layers), keep)
    small.model.layers = torch.nn.ModuleList([small.model.layers[i] for i in indices])
    for j, layer in enumerate(small.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j  # the KV cache is indexed by position in the stack
    small.config.num_hidden_layers = keep
    if isinstance(getattr(small.config, "layer_types", None), list):
        small.config.layer_types = [small.config.layer_types[i] for i in indices]
    return small


class FedPTClient(ClientRole):
    """A FedPT client: the inner algorithm's client on the small model (it never sees the large one)."""

    name = "fedpt"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.inner = INNER[cfg.fedpt_inner][1](cfg, model)
        self.plan = getattr(self.inner, "plan", None)

    @classmethod
    def prepare_model(cls, cfg, model):
        """The small model: ``model`` as loaded, or ``truncate_layers(model, fedpt_small_layers)``."""
        small = truncate_layers(model, cfg.fedpt_small_layers) if cfg.fedpt_small_layers else model
        return INNER[cfg.fedpt_inner][1].prepare_model(cfg, small)

    def train(self, model, steps, announcement, *, client_id, num_samples):
        return self.inner.train(model, steps, announcement, client_id=client_id, num_samples=num_samples)

    def apply_(self, model, downlink, round_index) -> None:
        self.inner.apply_(model, downlink, round_index)


class DistillationSet:
    """The server's distillation sequences for one round: prompts continued by the proxy.

    batches: (input_ids [B, T] int64, attention_mask [B, T], targets [B, T-1] bool: the
    positions whose next token the proxy generated, up to its eos) and the proxy's
    log-probabilities there, float32 [N, V] per batch (N = targets.sum()).
    """

    def __init__(self, proxy: ProxyTunedLM, prompts: Sequence[torch.Tensor], *, new_tokens: int, batch_size: int,
                 pad_token_id: int, eos_token_id: int):
        from ..data import collate_prompts

        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.teacher: list[torch.Tensor] = []
        device = proxy.device
        for start in range(0, len(prompts), batch_size):
            enc = {k: v.to(device) for k, v in collate_prompts(prompts[start:start + batch_size], pad_token_id).items()}
            ids = proxy.generate(**enc, max_new_tokens=new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
            prompt_len = enc["input_ids"].shape[1]
            generated = ids[:, prompt_len:]
            ended_before = (generated == eos_token_id).long().cumsum(1) - (generated == eos_token_id).long()
            targets = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
            targets[:, prompt_len - 1:] = ended_before == 0
            mask = torch.cat([enc["attention_mask"], torch.ones_like(generated)], dim=1)
            with torch.no_grad():
                logits = proxy(input_ids=ids, attention_mask=mask).logits[:, :-1][targets]
            self.batches.append((ids, mask, targets))
            self.teacher.append(torch.log_softmax(logits, dim=-1))

    @property
    def tokens(self) -> int:
        return sum(int(t.sum()) for _, _, t in self.batches)

    def kl(self, student: torch.nn.Module, index: int) -> torch.Tensor:
        """Mean over batch ``index``'s target positions of KL(proxy || student)."""
        from ..proxy import positions

        ids, mask, targets = self.batches[index]
        logits = student(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, :-1][targets]
        teacher = self.teacher[index]
        return torch.nn.functional.kl_div(torch.log_softmax(logits.float(), dim=-1), teacher, log_target=True,
                                          reduction="batchmean")

    @torch.no_grad()
    def mean_kl(self, student: torch.nn.Module) -> float:
        """Token-weighted mean KL(proxy || student) over every batch."""
        was_training = student.training
        student.eval()
        total = sum(float(self.kl(student, i)) * int(t.sum()) for i, (_, _, t) in enumerate(self.batches))
        student.train(was_training)
        return total / max(self.tokens, 1)


class FedPTServer(ServerRole):
    """The FedPT server: the inner algorithm's server, the large model (logits only), the
    anti-expert small base (moved by kept distillations only), and the distillation.
    ``last_report`` describes the latest round's distillation (KL before and after on the
    replayed model, whether it was kept)."""

    name = "fedpt"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        from ..models import load_causal_lm, load_tokenizer

        self.inner = INNER[cfg.fedpt_inner][0](cfg, model)
        self.model = model
        self.tokenizer = load_tokenizer(cfg.model)
        check_same_tokenizer(self.tokenizer, load_tokenizer(cfg.large_model), what="large_model (--large-model)")
        self.large, _ = load_causal_lm(cfg.large_model, cfg.dtype, cfg.device, seed=cfg.seed)
        self.large.eval().requires_grad_(False)
        self.base = copy.deepcopy(model).eval().requires_grad_(False)
        self.tuned: torch.nn.Module | None = None
        self.last_report: dict = {}
        self._prompts: list[torch.Tensor] | None = None

    @property
    def round(self) -> int:
        return self.inner.round

    def announce(self, round_index: int):
        return self.inner.announce(round_index)

    def proxy(self, small: torch.nn.Module) -> ProxyTunedLM:
        """large + fedpt_alpha * (small - base): the large model proxy-tuned by ``small``."""
        return ProxyTunedLM(self.large, small, self.base, alpha=self.cfg.fedpt_alpha)

    def prompts(self) -> list[torch.Tensor]:
        """The server's distillation prompts (module docstring), tokenized once."""
        if self._prompts is None:
            from ..data import named_rng, tokenize_prompt
            from ..simulation import load_dataset

            examples = [ex for client in load_dataset(self.cfg).clients for ex in client.examples]
            n = min(self.cfg.fedpt_distill_prompts, len(examples))
            picks = named_rng(self.cfg.data_seed, "fedpt/distill-prompts").choice(len(examples), size=n, replace=False)
            self._prompts = [tokenize_prompt(examples[i], self.tokenizer, self.cfg.max_length) for i in sorted(picks)]
        return self._prompts

    def evaluation_views(self, model: torch.nn.Module, round_index: int) -> dict[str, torch.nn.Module]:
        """The models the run evaluates beside ``model`` (the small model every peer holds,
        after the round): the large base before training; after a round the small model
        before distillation and the proxy large + alpha * (model - base). That is the proxy
        the round distilled: a kept distillation moved model and base alike, so the offset is
        the federated tuning either way (up to rounding)."""
        if round_index == 0:
            return {"large_base": self.large}
        if self.tuned is None:
            return {}
        return {"small_tuned": self.tuned, "proxy": self.proxy(model)}

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids=None, skip_refused=False) -> bytes:
        """The inner algorithm's merge, then the distillation; one downlink of the inner
        algorithm's wire format. A failure leaves the server at the same round."""
        self.check_round(round_index)
        before = self.inner.state_dict()
        inner_update = getattr(self.inner, "last_update", None)
        downlink = self.inner.aggregate(round_index, uploads, client_ids=client_ids, skip_refused=skip_refused)
        self.refusals = self.inner.refusals
        try:
            return self._distill(round_index, downlink)
        except BaseException:
            self.inner.load_state_dict(before)
            if inner_update is not None:
                self.inner.last_update = inner_update
            raise

    def _distill(self, round_index: int, inner_downlink: bytes) -> bytes:
        cfg = self.cfg
        t0 = time.perf_counter()
        tuned = copy.deepcopy(self.model)
        self.inner.apply_(tuned, inner_downlink, round_index)
        self.tuned = tuned.eval()
        self.last_report = {"kept": False}
        if cfg.fedpt_distill_steps == 0:
            return inner_downlink
        data = DistillationSet(self.proxy(self.tuned), self.prompts(), new_tokens=cfg.fedpt_distill_tokens,
                               batch_size=cfg.eval_batch_size, pad_token_id=self.tokenizer.pad_token_id,
                               eos_token_id=self.tokenizer.eos_token_id)
        kl_before = data.mean_kl(self.tuned)
        if cfg.fedpt_inner == "ferret":
            downlink = self._distill_ferret(round_index, data)
        else:
            downlink = self._distill_fedavg(round_index, data)
        replayed = copy.deepcopy(self.model)
        self.inner.apply_(replayed, downlink, round_index)
        kl_after = data.mean_kl(replayed)
        kept = math.isfinite(kl_after) and kl_after < kl_before
        if kept:
            self._move_base(replayed)
        else:
            if cfg.fedpt_inner == "ferret":
                self.inner.last_update = wire.decode_global_update(inner_downlink, self.inner.plan, round=round_index)
            downlink = inner_downlink
        self.last_report = {"kl_before": kl_before, "kl_after": kl_after, "kept": kept, "tokens": data.tokens,
                            "seconds": time.perf_counter() - t0}
        return downlink

    def _move_base(self, replayed: torch.nn.Module) -> None:
        """base += D, the distillation's change (replayed - tuned), so that the proxy's offset
        stays the federated tuning alone (module docstring)."""
        base, tuned = dict(self.base.named_parameters()), dict(self.tuned.named_parameters())
        shifts = {n: p.detach().float() - tuned[n].detach().float() for n, p in trainable(replayed)}
        with torch.no_grad():
            for n, shift in shifts.items():
                base[n].copy_(base[n].float() + shift)

    def _student(self) -> torch.nn.Module:
        """A trainable copy of the tuned small model, with the global model's trainable set."""
        student = copy.deepcopy(self.tuned)
        for p, q in zip(student.parameters(), self.model.parameters(), strict=True):
            p.requires_grad_(q.requires_grad)
        return student

    def _steps(self, student: torch.nn.Module, data: DistillationSet, step) -> None:
        """``fedpt_distill_steps`` steps of KL(proxy || student), one batch each in turn;
        ``step(params)`` updates the student from the gradients in ``params``' .grad."""
        params = [p for _, p in trainable(student)]
        student.train()
        for i in range(self.cfg.fedpt_distill_steps):
            student.zero_grad(set_to_none=True)
            data.kl(student, i % len(data.batches)).backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            step()
        student.zero_grad(set_to_none=True)
        student.eval()

    def _distill_ferret(self, round_index: int, data: DistillationSet) -> bytes:
        """Adam on K coefficients c of a fresh seed's bases, w = tuned - V^T c; returns the
        round's GlobalUpdate (the federated seed, then this one) as bytes."""
        cfg, plan = self.cfg, self.inner.plan
        federated = self.inner.last_update
        seed = derived_seed(cfg.seed, f"fedpt/distill/{round_index}")
        if seed in federated.seeds:
            raise RuntimeError(f"round {round_index}: the distillation seed equals a federated seed; change seed")
        student = self._student()
        params = plan.parameters(student)
        state: dict = {}

        def step():
            grads = [p.grad for p in params]
            if not state:
                counts = tuple(plan.counts_for(plan.block_norms(grads), plan.allocation))
                c = torch.zeros(sum(counts), dtype=torch.float32)
                state.update(counts=counts, c=c, opt=torch.optim.Adam([c], lr=cfg.fedpt_distill_lr, betas=ADAM_BETAS))
            counts, c = state["counts"], state["c"]
            # d loss / d c = -V g, since w = tuned - V^T c
            c.grad = -functional.project_blocks(grads, plan.block_sizes, counts, seed, distribution=plan.distribution,
                                                backend=plan.backend).float().cpu()
            previous = c.detach().clone()
            state["opt"].step()
            with torch.no_grad():
                functional.reconstruct_blocks_([p.detach() for p in params], plan.block_sizes, [list(counts)],
                                               (c - previous).to(params[0].device), [seed], alpha=-1.0,
                                               distribution=plan.distribution, backend=plan.backend)

        self._steps(student, data, step)
        # the GlobalUpdate applies w <- w - server_lr * V^T gamma to every seed's group
        distilled = (state["c"] / federated.server_lr).to(wire.DTYPES[cfg.coefficient_dtype]).to(torch.float32)
        update = GlobalUpdate(round_index, federated.seeds + (seed,), federated.counts + (state["counts"],),
                              federated.coefficients + (distilled,), federated.server_lr, plan.fingerprint, plan,
                              federated.start_digest)
        update.check(plan, round=round_index)
        downlink = wire.encode_global_update(update, dtype=cfg.coefficient_dtype)
        self.inner.last_update = update
        return downlink

    def _distill_fedavg(self, round_index: int, data: DistillationSet) -> bytes:
        """Adam on the weights; returns w_r - distilled as a FedAvg downlink (server_lr 1)."""
        student = self._student()
        opt = torch.optim.Adam([p for _, p in trainable(student)], lr=self.cfg.fedpt_distill_lr, betas=ADAM_BETAS)
        self._steps(student, data, opt.step)
        start = dict(trainable(self.model))
        delta = {n: (start[n].detach().float() - p.detach().float()) for n, p in trainable(student)}
        return encode_tensors(delta, {**_global_expected(self.inner.name, round_index), "server_lr": repr(1.0)})

    def apply_(self, model, downlink, round_index) -> None:
        self.inner.apply_(model, downlink, round_index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner server's state and the anti-expert's trainable tensors (``BASE_PREFIX``)."""
        base = dict(self.base.named_parameters())
        return {**self.inner.state_dict(),
                **{BASE_PREFIX + n: base[n].detach().clone() for n, _ in trainable(self.model)}}

    def load_state_dict(self, state) -> None:
        """Restore ``state_dict`` output; checked first, nothing changes on a bad dict."""
        if not isinstance(state, dict):
            raise ValueError(f"fedpt server state must be a dict; got {type(state).__name__}")
        base = dict(self.base.named_parameters())
        wanted = {BASE_PREFIX + n for n, _ in trainable(self.model)}
        given = {k for k in state if k.startswith(BASE_PREFIX)}
        if given != wanted:
            raise ValueError(f"fedpt server state must hold the anti-expert's {len(wanted)} trainable tensors "
                             f"({BASE_PREFIX}<name>); missing {sorted(wanted - given)[:3]}, unexpected "
                             f"{sorted(given - wanted)[:3]}")
        for key in sorted(wanted):
            t, p = state[key], base[key[len(BASE_PREFIX):]]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype \
                    or not bool(torch.isfinite(t).all()):
                raise ValueError(f"fedpt server state[{key!r}] must be a finite {p.dtype} tensor of shape "
                                 f"{tuple(p.shape)}")
        self.inner.load_state_dict({k: v for k, v in state.items() if k not in wanted})
        with torch.no_grad():
            for key in wanted:
                base[key[len(BASE_PREFIX):]].copy_(state[key])
