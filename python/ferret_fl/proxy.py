"""Proxy-tuning: a large model steered by the difference of a tuned and an untuned small one.

    proxy = ProxyTunedLM(large, small_tuned, small_base, alpha=1.0,
                         tokenizer=small_tokenizer, large_tokenizer=large_tokenizer)
    proxy(input_ids=ids, attention_mask=mask).logits     # [B, T, V] float32
    proxy.generate(**enc, max_new_tokens=64, do_sample=False)            # greedy
    proxy.generate(**enc, max_new_tokens=64, do_sample=True, top_p=0.9, generator=g)
    evaluation.mean_loss(proxy, batches); evaluation.evaluate_model(proxy, tokenizer, eval_set)

At every position the next-token logits are

    large(x) + alpha * (small_tuned(x) - small_base(x))        (float32, Liu et al. 2024)

so the three models must index one vocabulary the same way: ``check_same_tokenizer``
refuses two tokenizers that differ, naming the argument and the fix. The large model is
only ever asked for logits, so it may be a black box: either a causal LM module (its KV
cache is kept across decoding steps, as an inference service caches a prompt) or any
callable ``logits_fn(input_ids [B, T] int64, attention_mask [B, T] int64) -> [B, T, V]``
(called on the whole prefix at each decoding step, since a black box keeps no cache for
us). Logit widths may differ by padding rows (e.g. a vocabulary padded to a multiple of
64): the first min(widths) logits are combined, which must cover the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Texts whose token ids must agree between two tokenizers beyond an equal vocabulary
# (normalisation, pre-tokenisation, byte fallback, special tokens): ASCII prose, code,
# digits, whitespace runs, accented and non-Latin letters, an emoji.
TOKENIZER_PROBES = (
    "Below is an instruction that describes a task. Write a response.",
    "def f(x):\n    return x ** 2  # 12345 67.89\t\ttab",
    "  Leading spaces, trailing spaces   ",
    "Café naïve Ünïcödé — 東京 مرحبا Привет 🙂",
)


def check_same_tokenizer(tokenizer, large_tokenizer, *, what: str = "large_tokenizer") -> None:
    """Raise ValueError unless both tokenizers map every token to the same id and tokenise
    ``TOKENIZER_PROBES`` identically. ``what`` names the argument (or flag) to fix."""
    if tokenizer is None or large_tokenizer is None:
        raise ValueError(f"proxy-tuning needs both tokenizers to check they agree: pass {what} and tokenizer")
    small_vocab, large_vocab = tokenizer.get_vocab(), large_tokenizer.get_vocab()
    fix = (f"proxy-tuning adds logits id by id, so {what} must be the small model's tokenizer: pair models of one "
           "family (SmolLM2-135M with SmolLM2-1.7B, Llama-3.2-1B with Llama-3.1-8B)")
    if small_vocab != large_vocab:
        only_small = sorted(set(small_vocab) - set(large_vocab))
        moved = sorted(t for t in set(small_vocab) & set(large_vocab) if small_vocab[t] != large_vocab[t])
        example = (f"{moved[0]!r} is {small_vocab[moved[0]]} vs {large_vocab[moved[0]]}" if moved else
                   f"{only_small[0]!r} is missing" if only_small else "the large vocabulary has extra tokens")
        raise ValueError(f"{what} differs from the small model's tokenizer: {len(small_vocab)} vs {len(large_vocab)} "
                         f"tokens, {len(moved)} with different ids ({example}); {fix}")
    for text in TOKENIZER_PROBES:
        a = tokenizer(text, add_special_tokens=False)["input_ids"]
        b = large_tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ValueError(f"{what} tokenises {text[:24]!r}... differently from the small model's tokenizer "
                             f"({a[:6]} vs {b[:6]}); {fix}")
    if tokenizer.eos_token_id != large_tokenizer.eos_token_id:
        raise ValueError(f"{what} has eos id {large_tokenizer.eos_token_id}, the small model's is "
                         f"{tokenizer.eos_token_id}; {fix}")


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as transformers' generate makes them: 0 at each
    row's first real token, 1 at padding (never attended)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class _Stream:
    """One component of the proxy during decoding: a module with its own KV cache, or a
    black-box logits function fed the whole prefix every step."""

    def __init__(self, component):
        self.component = component
        self.cache = None

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        """[B, V] logits after ``ids`` (the whole sequence so far, [B, T])."""
        if not isinstance(self.component, torch.nn.Module):
            return _call_fn(self.component, ids, mask)[:, -1]
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        new = ids if step == 0 else ids[:, -1:]
        out = self.component(input_ids=new, attention_mask=mask, position_ids=positions(mask)[:, -new.shape[1]:],
                              past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


def _call_fn(fn: LogitsFn, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = fn(ids, mask)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the large model's logits function must return a [B, T, V] tensor for input_ids of shape "
                         f"{tuple(ids.shape)}; got {got}")
    return logits


def module_logits(model: torch.nn.Module) -> LogitsFn:
    """A causal LM as the black-box logits function ``ProxyTunedLM`` accepts (no cache)."""

    def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)).logits

    return logits_fn


class ProxyTunedLM(torch.nn.Module):
    """Logits large + alpha * (small_tuned - small_base) at every position.

    large: a causal LM module or a black-box ``logits_fn`` (module docstring).
    small_tuned, small_base: causal LM modules on one device (the proxy's device).
    alpha: weight of the offset (finite; 0 gives the large model's logits exactly).
    tokenizer, large_tokenizer: the small and the large model's tokenizers; when both are
    given they are checked with ``check_same_tokenizer`` (pass them: a mismatch otherwise
    gives garbage, not an error), and len(tokenizer) bounds the combined width.

    Nothing is trained through the proxy; ``forward`` returns an object with ``.logits``
    (float32 [B, T, V]) and ``.loss`` when ``labels`` are given (shifted cross-entropy,
    -100 ignored), so ``evaluation.mean_loss`` and ``evaluation.evaluate_model`` take it.
    """

    def __init__(self, large: torch.nn.Module | LogitsFn, small_tuned: torch.nn.Module, small_base: torch.nn.Module,
                 *, alpha: float = 1.0, tokenizer=None, large_tokenizer=None):
        super().__init__()
        if not (isinstance(large, torch.nn.Module) or callable(large)):
            raise TypeError(f"large must be a causal LM module or a logits function; got {type(large).__name__}")
        for name, m in (("small_tuned", small_tuned), ("small_base", small_base)):
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"{name} must be a causal LM module; got {type(m).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number (1: the plain offset, 0: the large model); got {alpha!r}")
        if tokenizer is not None or large_tokenizer is not None:
            check_same_tokenizer(tokenizer, large_tokenizer)
        self.large = large
        self.small_tuned = small_tuned
        self.small_base = small_base
        self.alpha = float(alpha)
        self.vocab_size = None if tokenizer is None else len(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.small_tuned.parameters()).device

    def combine(self, large: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """float32 large + alpha * (tuned - base) over the common width (last dim)."""
        width = min(large.shape[-1], tuned.shape[-1], base.shape[-1])
        if self.vocab_size is not None and width < self.vocab_size:
            raise ValueError(f"the models give {width} logits per position but the tokenizer has {self.vocab_size} "
                             "tokens: the large model is not the small model's family")
        large, tuned, base = (t[..., :width].float() for t in (large, tuned, base))
        return large + self.alpha * (tuned - base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = positions(attention_mask)

        def run(m):
            if isinstance(m, torch.nn.Module):
                return m(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
            return _call_fn(m, input_ids, attention_mask)

        logits = self.combine(run(self.large), run(self.small_tuned), run(self.small_base))
        loss = None
        if labels is not None:
            shifted = logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]),
                                                     labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None, **_) -> torch.Tensor:
        """Prompt ids followed by up to ``max_new_tokens`` new ones, [B, T + n] int64.

        Left-padded prompts, as ``transformers`` generate takes them; a row that produced
        eos is continued with ``pad_token_id`` and decoding stops when every row has.
        Greedy (``do_sample=False``) or sampling with ``temperature``, ``top_k``, ``top_p``
        (transformers' logits warpers) from ``generator`` (seed it for reproducibility).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if eos and pad_token_id is None:
            pad_token_id = eos[0]
        warpers = self._warpers(do_sample, temperature, top_k, top_p)
        streams = [_Stream(m) for m in (self.large, self.small_tuned, self.small_base)]
        ids, mask = input_ids, attention_mask
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            logits = self.combine(*(s.next_logits(ids, mask, step) for s in streams))
            if do_sample:
                scores = warpers(ids, logits)
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            if eos:
                token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if eos:
                unfinished &= ~torch.isin(token, torch.tensor(eos, device=token.device))
                if not bool(unfinished.any()):
                    break
        return ids

    @staticmethod
    def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
        from transformers.generation import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = LogitsProcessorList()
        if not do_sample:
            return warpers
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return warpers
