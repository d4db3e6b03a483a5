"""Run configuration: one dataclass, loaded from YAML and overridden by flags.

Every setting is a field of ``RunConfig`` with its help text; the CLI's ``run`` flags are
generated from these fields, and settings that name one of a fixed set of choices
(``CHOICES``) are checked by ``validate`` before any model or data is loaded. Unknown
keys are refused, so a typo never silently falls back to a default.

Defaults follow the paper's Natural Instructions setup for Ferret (configs/ holds each of
the paper's setups), with one rule for Ferret's server step:

    scale: paper    with the paper's server_lr (10 on Natural Instructions, 3 on Dolly), or
    scale: unbiased with server_lr / 3.

The paper's server learning rates were tuned for its reference code, whose coefficients
are about 1/3 of the unbiased ones (``ferret_kernels.plan.parity_factor``: d times the
variance of N(0, 1) truncated to +-1/sqrt(d)). Pairing the unbiased scale with the
paper's server lr takes 3x the paper's step and diverges on SmolLM2-135M within three
rounds; the run's loss guard (``divergence_factor``) stops such a run and names the knobs.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ferret_kernels.config import BACKENDS
from ferret_kernels.plan import ALLOCATIONS, SCALES, SEED_SCHEDULES
from ferret_kernels.rng import DISTRIBUTIONS
from ferret_kernels.robust import AGGREGATIONS
from ferret_kernels.server import CLIP_MODES, DEFAULT_INFLUENCE_CAP, DEFAULT_MAX_STEP, DEFAULT_SAMPLE_CAP, WEIGHTINGS
from ferret_kernels.wire import DTYPES as WIRE_DTYPES

from .models import DTYPES as MODEL_DTYPES

ALGORITHMS = ("ferret", "fedavg", "fedkseed", "fedit", "fedpt", "fedpipe")
FEDPT_INNER = ("ferret", "fedavg")
ATTACKS = ("scaled", "random", "sign_flip")
OPTIMIZERS = ("sgd", "adamw")


def setting(default, help: str):
    """A RunConfig field with its help text (shown by ``ferret-fl run --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    algorithm: str = setting("ferret", "federated algorithm")
    model: str = setting("smollm2-135m", "'smollm2-135m' (embedded), a hub id, a local directory, a .gguf path, or "
                                         "a LLaMA shape with random weights (llama-3b-shape, llama-1.3b-shape, "
                                         "llama-7b-shape, llama-tiny-shape)")
    dtype: str = setting("float32", "model weight dtype")
    device: str = setting("cpu", "torch device: cpu, cuda or cuda:N")
    data: str = setting("synthetic", "'ni-subset' (shipped Super-NaturalInstructions subset), 'synthetic', 'dolly' "
                                     "(hub), 'dolly:<file.jsonl>' or 'ni:<directory>'")
    data_seed: int = setting(42, "data seed: the synthetic instances, Dolly's split, NI's samples; kept fixed across "
                                 "training seeds so that every run sees the same clients")
    num_clients: int = setting(200, "clients to split Dolly over (Dirichlet)")
    dirichlet_alpha: float = setting(0.5, "Dirichlet concentration of Dolly's category split")
    min_client_samples: int = setting(10, "fewest examples a Dolly client may hold")
    clients_per_round: float = setting(0.05, "clients trained per round: a fraction (<= 1) or a count (> 1)")
    rounds: int = setting(12, "federated rounds")
    local_steps: int = setting(10, "optimizer steps per client and round")
    batch_size: int = setting(1, "examples per micro-batch")
    grad_accum: int = setting(4, "micro-batches accumulated per optimizer step")
    max_length: int = setting(1024, "longest tokenized example (prompt + response)")
    lr: float = setting(1e-4, "local (client) learning rate")
    optimizer: str = setting("sgd", "local optimizer")
    max_grad_norm: float | None = setting(None, "clip each local step's gradient to this norm (null: no clipping)")
    seed: int = setting(42, "run seed: client sampling, batch order, Ferret's round seeds, FedKSeed's candidates")
    weighting: str = setting("samples", "how the server weights clients: by their number of examples, or equally")
    # Ferret
    server_lr: float = setting(10.0, "Ferret's server step on the rebuilt mean update; the paper's value (10 NI, "
                                     "3 Dolly) goes with scale=paper, a third of it with scale=unbiased")
    server_lr_decay: float = setting(1.0, "Ferret's server lr is server_lr * decay^(round - 1)")
    budget: int = setting(7800, "Ferret: K, coefficients each client sends per round")
    distribution: str = setting("gaussian", "distribution of the random bases (Ferret, FedKSeed)")
    allocation: str = setting("norm", "Ferret: how K is split over the blocks")
    scale: str = setting("paper", "Ferret: coefficient scale; 'paper' matches the paper's server lr, 'unbiased' "
                                  "(E[rebuilt] = update) needs a third of it")
    seed_schedule: str = setting("per_round", "Ferret: a fresh seed per round, or one fixed seed pool for all rounds")
    server_momentum: float = setting(0.0, "Ferret: heavy-ball momentum on the merged coefficients (needs "
                                          "seed_schedule=fixed)")
    clip_norm: float | None = setting(None, "Ferret: bound on each block of the rebuilt server update (null: none)")
    clip: str = setting("block", "Ferret: how clip_norm measures a block")
    coefficient_dtype: str = setting("float32", "Ferret: dtype of the coefficients on the wire")
    backend: str = setting("auto", "ferret_kernels backend")
    aggregation: str = setting("mean", "Ferret: how the server merges the round's coefficients (median and trimmed_mean "
                               "resist Byzantine clients; docs/security.md)")
    trim_fraction: float = setting(0.1, "Ferret: fraction dropped from each end per coefficient by trimmed_mean")
    norm_bound: float | None = setting(None, "Ferret: scale each client's update to at most this estimated norm "
                                             "(null: none)")
    max_step: float | None = setting(DEFAULT_MAX_STEP, "Ferret: refuse an update that could move a weight further "
                                                       "than this (null: off)")
    influence_cap: float | None = setting(DEFAULT_INFLUENCE_CAP, "Ferret: refuse an update whose worst-case influence "
                                                                 "exceeds this multiple of the round's median (null: off)")
    sample_cap: float | None = setting(DEFAULT_SAMPLE_CAP, "Ferret: cap declared sample counts at this multiple of the "
                                                           "round's median (null: off)")
    byzantine_fraction: float = setting(0.0, "Ferret: fraction of each round's clients that attack (experiments; "
                                             "attacks.py)")
    attack: str = setting("scaled", "Ferret: what Byzantine clients send: scaled (x -100), random (noise of 100x the "
                                    "honest norm), sign_flip")
    # FedAvg, FedIT and FedPipe
    fedavg_server_lr: float = setting(1.0, "FedAvg / FedIT / FedPipe: server step on the mean client update (1: plain "
                                           "mean)")
    # FedKSeed
    kseed_candidates: int = setting(4096, "FedKSeed: candidate seeds K")
    kseed_eps: float = setting(5e-4, "FedKSeed: perturbation size of the two-point estimate")
    kseed_lr: float = setting(3e-7, "FedKSeed: zeroth-order learning rate")
    # FedIT
    lora_rank: int = setting(8, "FedIT: LoRA rank (FedPipe keeps FedIT's scaling lora_alpha / lora_rank at every rank)")
    lora_alpha: int = setting(16, "FedIT: LoRA alpha")
    # FedPipe (algorithms/fedpipe.py)
    fedpipe_profiles: str = setting("2600:1,1450:0.5,850:0.5,725:0.25",
                                    "FedPipe: client resource profiles MB:SPEED (training memory, speed relative to "
                                    "the reference device); client c has entry c mod n. The default makes SmolLM2-135M "
                                    "clients of the NI subset at max_length 1024 pick every precision "
                                    "(benchmarks/bench_fedpipe.py)")
    fedpipe_adapter_budget: float = setting(0.0035, "FedPipe: most adapter parameters a client trains, as a fraction "
                                            "of the model's parameters (FedIT's rank-8 q,v adapters: 0.34 percent of "
                                            "SmolLM2-135M)")
    fedpipe_ranks: str = setting("2,4,8,16", "FedPipe: the ranks an adapter may take")
    fedpipe_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                   "FedPipe: the linear layers (by name suffix) that may get an adapter")
    fedpipe_precisions: str = setting("none,int8,int4", "FedPipe: the frozen-base precisions a client may use, best "
                                      "first (none: the model's dtype; int8 / int4: optimum-quanto)")
    fedpipe_score_batches: int = setting(1, "FedPipe: micro-batches of a client's first steps its importance scores "
                                         "are measured on")
    # FedPT (algorithms/fedpt.py)
    large_model: str = setting("", "FedPT: the large model, used only through its logits (same forms as --model); "
                                   "its tokenizer must be --model's")
    fedpt_inner: str = setting("ferret", "FedPT: how the clients tune the small model")
    fedpt_small_layers: int = setting(0, "FedPT: make the small model from --model by keeping its first and last "
                                         "N/2 decoder layers (0: --model as loaded)")
    fedpt_alpha: float = setting(1.0, "FedPT: proxy logits = large + alpha * (small_tuned - small_base)")
    fedpt_distill_steps: int = setting(8, "FedPT: server distillation steps per round, one batch of eval_batch_size "
                                          "sequences each (0: no distillation)")
    fedpt_distill_lr: float = setting(1e-5, "FedPT: Adam step of the distillation, on the K coefficients of its "
                                            "random bases (fedpt_inner=ferret) or on the weights (fedavg)")
    fedpt_distill_prompts: int = setting(32, "FedPT: training prompts (instruction + input, no response) the server "
                                             "distils on, drawn with data_seed")
    fedpt_distill_tokens: int = setting(32, "FedPT: tokens the proxy generates after each prompt, the positions "
                                            "distilled")
    # evaluation
    eval_every: int = setting(0, "Rouge-L every this many rounds (0: only before the first and after the last)")
    eval_samples: int = setting(64, "held-out examples for Rouge-L and exact match, split equally over every "
                                    "held-out task (eval_samples // tasks each, at least 1, at most the smallest "
                                    "task); drawn with a fixed seed, never the training seed")
    eval_loss_samples: int = setting(64, "held-out examples for the held-out loss (every round), split over the "
                                         "held-out tasks like eval_samples")
    max_new_tokens: int = setting(128, "generation budget for Rouge-L")
    eval_batch_size: int = setting(8, "evaluation batch size")
    divergence_factor: float = setting(1.5, "stop the run when the held-out loss exceeds this factor times the best "
                                            "so far, or is not finite (0: never stop)")
    output_dir: str = setting("runs/latest", "where metrics.jsonl and the checkpoint go")

    def validate(self) -> RunConfig:
        """Check every setting (choices, ranges); raise ValueError naming the setting and the fix."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        for name in ("rounds", "local_steps", "batch_size", "grad_accum", "max_length", "budget", "kseed_candidates",
                     "lora_rank", "eval_samples", "eval_loss_samples", "max_new_tokens", "eval_batch_size",
                     "num_clients", "min_client_samples", "fedpt_distill_prompts", "fedpt_distill_tokens",
                     "fedpipe_score_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.clients_per_round > 0:
            raise ValueError(f"clients_per_round must be > 0 (a fraction <= 1 or a count); got {self.clients_per_round}")
        for name in ("lr", "server_lr", "fedavg_server_lr", "kseed_lr", "kseed_eps", "dirichlet_alpha",
                     "fedpt_distill_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if not 0 < self.server_lr_decay <= 1:
            raise ValueError(f"server_lr_decay must be in (0, 1]; got {self.server_lr_decay}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1); got {self.server_momentum}")
        if self.server_momentum and self.seed_schedule != "fixed":
            raise ValueError("server_momentum adds coefficients across rounds, which needs the same bases every round: "
                             "set seed_schedule=fixed")
        for name in ("clip_norm", "max_grad_norm"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, or null for no clipping; got {getattr(self, name)}")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, or 0 to never stop; got {self.divergence_factor}")
        for name in ("norm_bound", "max_step", "influence_cap", "sample_cap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, or null to turn it off; got {getattr(self, name)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5); got {self.trim_fraction}")
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction must be in [0, 1); got {self.byzantine_fraction}")
        if self.byzantine_fraction and self.algorithm != "ferret":
            raise ValueError(f"byzantine_fraction is implemented for algorithm=ferret; got {self.algorithm!r}")
        for name in ("fedpt_small_layers", "fedpt_distill_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0 < self.fedpipe_adapter_budget < 1:
            raise ValueError(f"fedpipe_adapter_budget must be a fraction in (0, 1); got {self.fedpipe_adapter_budget}")
        if self.algorithm == "fedpipe":
            from .fedpipe.spec import check_settings

            check_settings(self)
        if not math.isfinite(self.fedpt_alpha):
            raise ValueError(f"fedpt_alpha must be finite; got {self.fedpt_alpha}")
        if self.algorithm == "fedpt" and not self.large_model:
            raise ValueError("algorithm=fedpt needs large_model (--large-model): the large model proxy-tuned through "
                             "--model, e.g. --large-model smollm2-135m --model smollm2-135m --fedpt-small-layers 6")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0; got {self.eval_every}")
        for name in ("seed", "data_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not (self.device == "cpu" or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        return self


# Settings that name one of a fixed set of choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ALGORITHMS,
    "optimizer": OPTIMIZERS,
    "dtype": tuple(MODEL_DTYPES),
    "weighting": tuple(WEIGHTINGS),
    "distribution": tuple(DISTRIBUTIONS),
    "allocation": tuple(ALLOCATIONS),
    "scale": tuple(SCALES),
    "seed_schedule": tuple(SEED_SCHEDULES),
    "clip": tuple(CLIP_MODES),
    "coefficient_dtype": tuple(WIRE_DTYPES),
    "backend": tuple(BACKENDS),
    "aggregation": tuple(AGGREGATIONS),
    "attack": ATTACKS,
    "fedpt_inner": FEDPT_INNER,
}

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


# Settings only one algorithm reads, by name prefix. A run of any other algorithm is the same run
# whatever their values, so the checks that a run or checkpoint was made with the same settings
# skip them: a new FedPipe default must not invalidate finished Ferret runs.
_OWNED_PREFIXES = {"fedpipe": ("fedpipe_",), "fedpt": ("fedpt_", "large_model"), "fedkseed": ("kseed_",)}


def inert_settings(algorithm: str) -> frozenset[str]:
    """The settings a run of ``algorithm`` never reads (other algorithms' own settings)."""
    return frozenset(name for owner, prefixes in _OWNED_PREFIXES.items() if owner != algorithm
                     for name in FIELDS if name.startswith(prefixes))


def field_type(name: str) -> tuple[type, bool]:
    """(base type, whether null is allowed) of setting ``name``."""
    hint = _TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], True
    return hint, False


def coerce(name: str, value: Any) -> Any:
    """``value`` converted to the type of setting ``name`` (flags and YAML strings)."""
    if name not in FIELDS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(FIELDS))}")
    typ, nullable = field_type(name)
    if nullable and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", ""))):
        return None
    try:
        if isinstance(value, bool) and typ in (int, float):
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a{'n int' if typ is int else ' number'}"
                         f"{' or null' if nullable else ''}; got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r}")
    return value


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from a YAML file (optional) and overrides (None values ignored), validated."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return RunConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
