"""Evaluation set, the three metrics against their references, results, baselines and generation.

``fixtures/rouge_l_paper_golden.json`` holds scores computed by pltrdy ``rouge`` 1.0.1 (the
package and call of the Ferret reference code) for hand-written edge cases, random texts with
periods, commas, case and repeats, and pairs from the shipped NI subset; it discriminates the
LCS tie rule (flipping it changes 14 of the 372 scores).
"""

import json
import os

import numpy as np
import pytest
import torch

from ferret_fl import evaluation
from ferret_fl.data import ClientData, Example, FederatedDataset, load_ni_subset
from ferret_fl.evaluation import (
    EvalResult,
    build_eval_set,
    echo_predictions,
    exact_match,
    generate_greedy,
    normalize_answer,
    rouge_l,
    rouge_l_google,
    rouge_l_paper,
    score_predictions,
    summary_table,
    task_table,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "rouge_l_paper_golden.json")


def _dataset(sizes):
    examples = tuple(Example("Say it.", f"{task} input {i}", f"{task} output {i}", task)
                     for task, n in sizes.items() for i in range(n))
    return FederatedDataset("toy", (ClientData("c0", examples[:1]),), examples, tuple(sizes))


def test_rouge_l_paper_matches_the_reference_package():
    with open(GOLDEN, encoding="utf-8") as reader:
        cases = json.load(reader)["cases"]
    assert len(cases) > 300
    ours = np.array([rouge_l_paper(c["prediction"], c["reference"]) for c in cases])
    theirs = 100.0 * np.array([c["f"] for c in cases])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("prediction", "reference", "paper", "google"),
    [
        ("Yes", "yes", 0.0, 100.0),  # case: the paper's code is case-sensitive
        ("Yes,", "Yes", 0.0, 100.0),  # punctuation stays on the word in the paper's code
        ("Yes.", "Yes", 100.0, 100.0),  # ... except periods, which split sentences
        ("the cat the cat", "the cat", 100.0, 66.6667),  # distinct words vs token counts
        ("", "anything", 0.0, 0.0),
        ("...", "a b", 0.0, 0.0),
    ],
)
def test_rouge_l_variants_differ_where_documented(prediction, reference, paper, google):
    assert rouge_l_paper(prediction, reference) == pytest.approx(paper, abs=1e-5)
    assert rouge_l_google(prediction, reference) == pytest.approx(google, abs=1e-3)


def test_rouge_l_google_is_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("The Eagle is a pub near Burger King.", "Near Burger King, The Eagle pub serves food."),
             ("entailment", "Entailment"), ("1 2 3 4", "4 3 2 1")]
    for prediction, reference in pairs:
        assert rouge_l_google(prediction, reference) == pytest.approx(
            100 * scorer.score(reference, prediction)["rougeL"].fmeasure, abs=1e-12)


def test_exact_match_normalisation():
    assert normalize_answer("  The  Answer: 'B'! ") == "the answer b"
    assert exact_match("Entailment.", "entailment") == 100.0
    assert exact_match("not entailment", "entailment") == 0.0
    assert exact_match("", "") == 100.0


def test_rouge_l_mean_and_errors():
    assert rouge_l(["a b", "c"], ["a b", "d"], variant="rouge_l_paper") == pytest.approx(50.0, abs=1e-5)
    with pytest.raises(ValueError, match="variant"):
        rouge_l(["a"], ["a"], variant="rouge")
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


def test_eval_set_takes_every_task_equally_and_ignores_the_training_seed():
    fed = _dataset({"t1": 5, "t2": 9, "t3": 7})
    eval_set = build_eval_set(fed)
    assert eval_set.tasks == ("t1", "t2", "t3") and eval_set.per_task == 5 and len(eval_set) == 15
    assert eval_set.example_tasks == ("t1",) * 5 + ("t2",) * 5 + ("t3",) * 5
    assert build_eval_set(fed) == eval_set  # fixed by its own seed
    other = build_eval_set(fed, seed=1)
    assert other.examples[:5] == eval_set.examples[:5]  # t1 is taken whole
    assert other.examples[5:] != eval_set.examples[5:]
    kept = [int(ex.input.split()[-1]) for ex in eval_set.examples[5:10]]
    assert kept == sorted(kept) and len(set(kept)) == 5  # source order, no repeats
    assert len(build_eval_set(fed, per_task=3)) == 9
    with pytest.raises(ValueError, match="t1"):
        build_eval_set(fed, per_task=6)
    with pytest.raises(ValueError, match="no held-out"):
        build_eval_set(FederatedDataset("empty", (), (), ()))


def test_ni_subset_eval_set_and_echo_baseline():
    eval_set = build_eval_set(load_ni_subset())
    assert len(eval_set.tasks) == 13 and eval_set.per_task == 16 and len(eval_set) == 208
    echo = score_predictions(echo_predictions(eval_set), eval_set)
    assert echo.predictions == tuple(ex.input for ex in eval_set.examples)
    # The benchmark must leave room above echoing the input (the synthetic set scored 39.9).
    assert echo.mean("rouge_l_paper") < 10 and echo.mean("rouge_l_google") < 20
    assert echo.mean("exact_match") == 0.0
    per_task = echo.per_task("rouge_l_paper")
    assert list(per_task) == list(eval_set.tasks)
    assert np.mean(list(per_task.values())) == pytest.approx(echo.mean("rouge_l_paper"))


def test_eval_result_scores_tables_and_round_trip(tmp_path):
    fed = _dataset({"t1": 2, "t2": 2})
    eval_set = build_eval_set(fed)
    outputs = [ex.output for ex in eval_set.examples]
    perfect = score_predictions(outputs, eval_set)
    wrong = score_predictions(["no"] * 4, eval_set)
    assert perfect.mean("exact_match") == 100.0 and perfect.mean("rouge_l_google") == pytest.approx(100.0)
    assert perfect.mean("rouge_l_paper") == pytest.approx(100.0, abs=1e-5)
    assert wrong.per_task("rouge_l_paper") == {"t1": 0.0, "t2": 0.0}
    half = score_predictions(outputs[:1] + ["no"] * 3, eval_set)
    assert half.per_task("exact_match") == {"t1": 50.0, "t2": 0.0} and half.mean("exact_match") == 25.0
    table = task_table({"trained": perfect, "echo": wrong}, "exact_match")
    assert "| t1 | 100.0 | 0.0 |" in table and "| **mean** | **100.0** | **0.0** |" in table
    assert "| echo | 0.00 | 0.00 | 0.00 |" in summary_table({"echo": wrong})
    path = tmp_path / "result.json"
    half.save(str(path))
    loaded = EvalResult.load(str(path))
    assert loaded.tasks == half.tasks and loaded.predictions == half.predictions
    for metric in evaluation.METRICS:
        np.testing.assert_array_equal(loaded.scores[metric], half.scores[metric])
    with pytest.raises(KeyError, match="bleu"):
        half.mean("bleu")
    with pytest.raises(ValueError):
        score_predictions(outputs[:3], eval_set)


class _ScriptedLM(torch.nn.Module):
    """Greedy decoding of this model appends token (last + 1) until it reaches ``stop``, then eos."""

    def __init__(self, vocab, stop, eos):
        super().__init__()
        self.vocab, self.stop, self.eos = vocab, stop, eos
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        assert not do_sample and attention_mask.shape == input_ids.shape
        rows = []
        for row in input_ids.tolist():
            new, last = [], row[-1]
            for _ in range(max_new_tokens):
                last = self.eos if last >= self.stop or last == self.eos else last + 1
                new.append(last)
                if last == self.eos:
                    break
            rows.append(row + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


class _DigitTokenizer:
    """Characters '0'-'9' are tokens 0-9, ' ' is 10; 11 is eos and padding."""

    eos_token_id = pad_token_id = 11

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [10 if ch == " " else int(ch) % 10 for ch in text if ch.isdigit() or ch == " "]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(" " if t == 10 else str(t) for t in row.tolist() if t != 11) for row in rows]


def test_generate_greedy_restores_order_and_respects_the_cap(monkeypatch):
    monkeypatch.setattr(evaluation, "tokenize_prompt", lambda ex, tok, max_length: torch.tensor(tok(ex.input)["input_ids"]))
    examples = [Example("", "5", ""), Example("", "1 2 3 4 1", ""), Example("", "8", ""), Example("", "0 0 7", "")]
    model = _ScriptedLM(vocab=12, stop=9, eos=11)
    out = generate_greedy(model, _DigitTokenizer(), examples, max_new_tokens=3, batch_size=2)
    assert out == ["678", "234", "9", "89"]
    assert model.training  # restored


# ---- the loss: LM head at scored positions only ---------------------------------------------------


def _loss_batch():
    """Three rows of 17 tokens, right-padded, each scoring a different span (one row's span is empty
    of scored tokens after the shift: only its first token is labelled)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 500, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 9:17] = ids[0, 9:17]
    labels[1, 5:12] = ids[1, 5:12]
    labels[2, 0] = ids[2, 0]
    return ids, mask, labels


def _reference_loss(model, ids, mask, labels):
    """float64 (sum, count) of the shifted cross-entropy over every position's logits."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    target = labels[:, 1:]
    scored = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return -(logp * scored).sum(), int(scored.sum())


def test_response_loss_matches_the_float64_reference_and_transformers():
    from ferret_fl.models import load_causal_lm, response_loss

    model, _ = load_causal_lm("llama-tiny-shape", seed=2)
    ids, mask, labels = _loss_batch()
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        mean = response_loss(model, ids, mask, labels)
        total = response_loss(model, ids, mask, labels, reduction="sum")
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ref_sum, count = _reference_loss(model.double(), ids, mask, labels)
    # the head ran on the 12 positions some row scores (row 0: 8..15, row 1: 4..10), not on all 17
    assert rows[:2] == [12, 12]
    assert mean.dtype == torch.float32 and count == 15
    torch.testing.assert_close(total.double(), ref_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), ref_sum / count, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, hf, rtol=1e-6, atol=0)


def test_response_loss_gradients_match_transformers_loss():
    from ferret_fl.models import load_causal_lm, response_loss

    ids, mask, labels = _loss_batch()
    grads = []
    for ours in (True, False):
        model, _ = load_causal_lm("llama-tiny-shape", seed=2)
        loss = (response_loss(model, ids, mask, labels) if ours
                else model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_response_loss_without_logits_to_keep_and_through_peft():
    from peft import LoraConfig, get_peft_model

    from ferret_fl.models import _takes_logits_to_keep, load_causal_lm, response_loss

    class FullLogits(torch.nn.Module):
        """A model whose forward knows nothing of logits_to_keep (as ProxyTunedLM or an older LM)."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask=None, **_):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask)

    model, _ = load_causal_lm("llama-tiny-shape", seed=2)
    ids, mask, labels = _loss_batch()
    with torch.no_grad():
        want = response_loss(model, ids, mask, labels)
        assert not _takes_logits_to_keep(FullLogits(model))
        torch.testing.assert_close(response_loss(FullLogits(model), ids, mask, labels), want, rtol=1e-6, atol=0)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
        assert _takes_logits_to_keep(peft_model)
        torch.testing.assert_close(response_loss(peft_model, ids, mask, labels), want, rtol=1e-6, atol=0)


def test_response_loss_with_nothing_scored_and_bad_reduction():
    from ferret_fl.models import load_causal_lm, response_loss

    model, _ = load_causal_lm("llama-tiny-shape", seed=2)
    ids, mask, _ = _loss_batch()
    nothing = torch.full_like(ids, -100)
    with torch.no_grad():
        assert torch.isnan(response_loss(model, ids, mask, nothing))
        assert response_loss(model, ids, mask, nothing, reduction="sum") == 0
        assert torch.isnan(model(input_ids=ids, attention_mask=mask, labels=nothing).loss)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        response_loss(model, ids, mask, nothing, reduction="none")
