"""Data layer: Dolly and Natural Instructions loaders on the fixtures, the Dirichlet split,
Alpaca prompts with label masking, truncation, collation, and the synthetic benchmark.

Uses a byte-level BPE tokenizer trained here on a few sentences, so nothing is downloaded.
"""

import json
import os
import random
import sys
import types

import numpy as np
import pytest
import torch

from ferret_fl.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    DEFAULT_HELDOUT_TASKS,
    DOLLY_CATEGORIES,
    IGNORE_INDEX,
    NI_SUBSET_DIR,
    TASKS,
    Collator,
    Example,
    category_codes,
    collate,
    collate_prompts,
    dirichlet_label_split,
    eval_cap,
    format_prompt,
    generate_instances,
    load_data,
    load_dolly,
    load_natural_instructions,
    load_ni_subset,
    load_synthetic,
    ni_subset_build,
    number_to_words,
    read_dolly_jsonl,
    read_task,
    tokenize_example,
    tokenize_examples,
    tokenize_prompt,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOLLY = os.path.join(FIXTURES, "dolly_sample.jsonl")
NI_ROOT = os.path.join(FIXTURES, "natural_instructions")
# The curated upstream subset the shipped files are built from: shared/ lies beside the checkout
# (CI, main) or beside its parent (a worktree under wt/).
NI_SUBSET_SOURCE = next(
    (path for up in (1, 2) if os.path.isdir(path := os.path.join(REPO, *[".."] * up, "shared", "data", "ni-subset"))),
    "",
)


def _dolly_rows():
    with open(DOLLY, encoding="utf-8") as reader:
        return [json.loads(line) for line in reader]


def _client_keys(fed):
    return [[(ex.instruction, ex.input, ex.output) for ex in client.examples] for client in fed.clients]


def _make_tokenizer(pad_is_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT] + [row["response"] for row in _dolly_rows()]
    specials = ["<eos>"] if pad_is_eos else ["<pad>", "<eos>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    pad = "<eos>" if pad_is_eos else "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token=pad)


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer(pad_is_eos=False)


@pytest.fixture(scope="module")
def tokenizer_pad_is_eos():
    return _make_tokenizer(pad_is_eos=True)


# ---- Dolly ----------------------------------------------------------------------------------


def test_dolly_fixture_has_all_categories_coded_alphabetically():
    categories, codes = category_codes(read_dolly_jsonl(DOLLY))
    assert categories == DOLLY_CATEGORIES
    assert categories.index("summarization") == 7
    assert codes.shape == (60,) and codes.dtype == np.int64
    assert set(codes.tolist()) == set(range(8))


def test_dolly_split_holds_out_summarization_and_respects_minimum():
    fed = load_dolly(DOLLY, num_clients=4, alpha=0.5, min_samples_per_client=10, seed=0)
    assert fed.name == "dolly" and fed.num_clients == 4
    assert fed.eval_tasks == ("summarization",)
    assert len(fed.eval_examples) == 6 and all(ex.task == "summarization" for ex in fed.eval_examples)
    assert min(fed.client_sizes) >= 10 and sum(fed.client_sizes) == 54
    assert "summarization" not in fed.train_tasks
    assert len(fed.train_tasks) == 7
    every_train = [ex for client in fed.clients for ex in client.examples]
    assert len(set(every_train)) == 54  # a partition: no example twice
    first = fed.clients[0].examples[0]
    assert isinstance(first, Example) and first.output and first.instruction


def test_dolly_heldout_by_paper_code_or_other_name():
    by_code = load_dolly(DOLLY, num_clients=3, heldout_category=7, seed=1)
    by_name = load_dolly(DOLLY, num_clients=3, heldout_category="summarization", seed=1)
    assert _client_keys(by_code) == _client_keys(by_name)
    closed = load_dolly(DOLLY, num_clients=3, heldout_category="closed_qa", seed=1)
    assert closed.eval_tasks == ("closed_qa",) and len(closed.eval_examples) == 8
    assert "closed_qa" not in closed.train_tasks and "summarization" in closed.train_tasks
    with pytest.raises(ValueError):
        load_dolly(DOLLY, num_clients=3, heldout_category="poetry")
    with pytest.raises(ValueError):
        load_dolly(DOLLY, num_clients=3, heldout_category=8)


def test_dolly_split_reproducible_from_seed():
    a = load_dolly(DOLLY, num_clients=4, seed=3)
    b = load_dolly(DOLLY, num_clients=4, seed=3)
    c = load_dolly(DOLLY, num_clients=4, seed=4)
    assert a == b
    assert _client_keys(a) != _client_keys(c)


def test_dolly_too_many_clients_is_an_error():
    with pytest.raises(ValueError):
        load_dolly(DOLLY, num_clients=6, min_samples_per_client=10)


def test_dolly_eval_subset():
    fed = load_dolly(DOLLY, num_clients=3, max_eval_examples=4, seed=0)
    assert len(fed.eval_examples) == 4
    assert fed.eval_examples == load_dolly(DOLLY, num_clients=3, max_eval_examples=4, seed=0).eval_examples


def test_dolly_hub_path_uses_datasets_lazily(monkeypatch):
    rows = _dolly_rows()
    calls = []

    def load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    from_hub = load_dolly("databricks/databricks-dolly-15k", num_clients=3, seed=5)
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert from_hub == load_dolly(DOLLY, num_clients=3, seed=5)


def test_dirichlet_split_at_paper_scale():
    # Dolly-15K's category sizes less summarization: 13,823 samples, 7 labels, 200 clients.
    sizes = [1766, 2136, 1773, 709, 2191, 1506, 3742]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    parts = dirichlet_label_split(labels, 200, 0.5, 10, np.random.default_rng(0))
    assert len(parts) == 200 and min(len(p) for p in parts) >= 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    # Non-IID: most clients are dominated by one label.
    dominant = [np.bincount(labels[p], minlength=7).max() / len(p) for p in parts]
    assert np.median(dominant) > 0.4


def test_dirichlet_split_gives_up_when_minimum_unreachable():
    labels = np.zeros(30, dtype=np.int64)
    with pytest.raises(ValueError):
        dirichlet_label_split(labels, 4, 0.5, 10, np.random.default_rng(0))
    with pytest.raises(RuntimeError):
        dirichlet_label_split(labels, 3, 0.01, 10, np.random.default_rng(0), max_attempts=5)


# ---- Natural Instructions --------------------------------------------------------------------


def test_ni_filters_and_sampling_counts():
    fed = load_natural_instructions(NI_ROOT, seed=0)
    assert fed.name == "natural_instructions"
    # task003 has 15 instances and task004 15 short ones: both below 20, dropped.
    assert [c.name for c in fed.clients] == ["task001_fixture_word_reversal", "task002_fixture_review_sentiment"]
    assert fed.client_sizes == [6, 10]  # 20% of 30 and of the 50 inputs shorter than 1024 chars
    for client in fed.clients:
        assert all(len(ex.input) < 1024 and ex.task == client.name for ex in client.examples)
    with open(os.path.join(NI_ROOT, "tasks", "task001_fixture_word_reversal.json"), encoding="utf-8") as reader:
        raw = json.load(reader)
    first_output = {item["input"]: item["output"][0] for item in raw["Instances"]}
    for ex in fed.clients[0].examples:
        assert ex.instruction == raw["Definition"][0] and ex.output == first_output[ex.input]


def test_ni_length_filter_is_strict():
    kept = read_task(NI_ROOT, "task002_fixture_review_sentiment", max_input_chars=1024)
    assert len(kept) == 50 and max(len(ex.input) for ex in kept) == 1023


def test_ni_eval_tasks_capped():
    fed = load_natural_instructions(NI_ROOT, seed=0)
    assert fed.eval_tasks == ("task005_fixture_capital_questions", "task006_fixture_plural_forms")
    by_task = fed.eval_examples_by_task()
    assert [len(v) for v in by_task.values()] == [12, 20]  # all 12; 27 short ones capped at max(20, 2%)
    assert all(ex.output.startswith("Sentence") for ex in by_task["task006_fixture_plural_forms"])  # output[0]
    assert fed.seen_task_eval_examples == ()
    looser = load_natural_instructions(NI_ROOT, eval_fraction=0.5, eval_min_instances=5, seed=0)
    assert [len(v) for v in looser.eval_examples_by_task().values()] == [6, 13]


def test_ni_eval_cap_formula():
    assert eval_cap(12) == 12
    assert eval_cap(27) == 20
    assert eval_cap(1000) == 20
    assert eval_cap(1550) == 31
    assert eval_cap(6500) == 130


def test_ni_sampling_reproducible_from_seed():
    a = load_natural_instructions(NI_ROOT, seed=11)
    assert a == load_natural_instructions(NI_ROOT, seed=11)
    assert _client_keys(a) != _client_keys(load_natural_instructions(NI_ROOT, seed=12))


# ---- prompts, tokenization, collation --------------------------------------------------------


def test_alpaca_templates():
    with_input = Example("Add the numbers.", "2 + 3", "5")
    assert format_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:"
    )
    assert format_prompt(Example("Name a colour.", "", "Red")) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:"
    )


def test_labels_mask_exactly_the_prompt(tokenizer):
    example = Example("Summarize the passage in one sentence.", "The council met on Tuesday.", "They met Tuesday.")
    item = tokenize_example(example, tokenizer)
    prompt_ids = tokenizer(format_prompt(example))["input_ids"]
    target_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = len(prompt_ids)
    assert item.input_ids.dtype == torch.long and item.labels.dtype == torch.long
    assert item.input_ids.tolist() == prompt_ids + target_ids
    assert item.labels[:p].tolist() == [IGNORE_INDEX] * p
    assert item.labels[p:].tolist() == target_ids
    assert item.num_target_tokens == len(target_ids)
    assert tokenizer.decode(item.input_ids[p:]) == example.output + "<eos>"


def test_truncation(tokenizer):
    example = Example("Write a limerick about a cat.", "", "A cat with a taste for the cream would plot and scheme.")
    full = tokenize_example(example, tokenizer, max_length=1024)
    p = int((full.labels == IGNORE_INDEX).sum())
    cut = tokenize_example(example, tokenizer, max_length=p + 3)
    assert len(cut.input_ids) == p + 3
    assert cut.input_ids.tolist() == full.input_ids[: p + 3].tolist()
    assert cut.labels.tolist() == full.labels[: p + 3].tolist() and cut.num_target_tokens == 3
    prompt_only = tokenize_example(example, tokenizer, max_length=p - 2)
    assert len(prompt_only.input_ids) == p - 2 and prompt_only.num_target_tokens == 0
    tail = tokenize_prompt(example, tokenizer, max_length=5)
    assert tail.tolist() == full.input_ids[p - 5 : p].tolist()  # left cut keeps "### Response:"


def test_collate_pads_right(tokenizer_pad_is_eos):
    tok = tokenizer_pad_is_eos
    examples = [Example("Name a colour.", "", "Red"), Example("Add the numbers.", "2 + 3", "The answer is 5.")]
    items = tokenize_examples(examples, tok)
    lengths = [len(item.input_ids) for item in items]
    batch = collate(items, tok.pad_token_id)
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for value in batch.values():
        assert value.shape == (2, width) and value.dtype == torch.long
    short = int(np.argmin(lengths))
    n = lengths[short]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    # pad id == eos id here: the final eos stays attended and supervised, the padding does not.
    assert batch["attention_mask"][short, n - 1] == 1 and batch["labels"][short, n - 1] == tok.eos_token_id
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert batch["input_ids"][short, :n].tolist() == items[short].input_ids.tolist()
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=Collator(tok.pad_token_id))
    assert torch.equal(next(iter(loader))["labels"], batch["labels"])


def test_collate_prompts_pads_left(tokenizer):
    prompts = [tokenize_prompt(Example("Name a colour.", "", "Red"), tokenizer), torch.tensor([5, 6, 7])]
    batch = collate_prompts(prompts, tokenizer.pad_token_id)
    width = len(prompts[0])
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][1, -3:].tolist() == [5, 6, 7]
    assert (batch["input_ids"][1, :-3] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"].tolist()[1] == [0] * (width - 3) + [1, 1, 1]
    assert batch["attention_mask"][0].all()


# ---- synthetic benchmark ---------------------------------------------------------------------


def test_synthetic_task_table():
    names = [task.name for task in TASKS]
    assert len(names) >= 20 and len(set(names)) == len(names)
    assert set(DEFAULT_HELDOUT_TASKS) < set(names)
    assert number_to_words(0) == "zero" and number_to_words(40) == "forty" and number_to_words(87) == "eighty-seven"


def test_synthetic_is_deterministic():
    a, b = load_synthetic(seed=0), load_synthetic(seed=0)
    assert a == b
    assert _client_keys(a) != _client_keys(load_synthetic(seed=1))
    # Pinned values: the streams are seeded from strings, never from the per-process str hash.
    add = generate_instances("synth006_add_numbers", 2, seed=0)
    assert [(ex.input, ex.output) for ex in add] == [("75 + 69", "144"), ("48 + 41", "89")]


def test_synthetic_heldout_and_seen_splits():
    fed = load_synthetic(train_instances_per_task=32, eval_instances_per_task=5, seed=0)
    client_names = {c.name for c in fed.clients}
    assert fed.num_clients == len(TASKS) - len(DEFAULT_HELDOUT_TASKS) >= 20
    assert client_names.isdisjoint(fed.eval_tasks) and set(fed.eval_tasks) == set(DEFAULT_HELDOUT_TASKS)
    assert {ex.task for ex in fed.eval_examples} == set(fed.eval_tasks)
    assert len(fed.eval_examples) == 5 * len(fed.eval_tasks)
    assert {ex.task for ex in fed.seen_task_eval_examples} == client_names
    inputs_by_task = {c.name: {ex.input for ex in c.examples} for c in fed.clients}
    assert all(ex.input not in inputs_by_task[ex.task] for ex in fed.seen_task_eval_examples)
    assert min(fed.client_sizes) >= 32 and max(fed.client_sizes) == 32
    custom = load_synthetic(heldout_tasks=["synth001_uppercase_word"], seed=0)
    assert custom.eval_tasks == ("synth001_uppercase_word",) and custom.num_clients == len(TASKS) - 1
    with pytest.raises(ValueError):
        load_synthetic(heldout_tasks=["no_such_task"])


def test_synthetic_targets_short_and_determined_by_input():
    for task in TASKS:
        examples = generate_instances(task, 40, seed=2)
        assert len(examples) == 40 and len({ex.input for ex in examples}) == 40
        for ex in examples:
            assert ex.instruction == task.definition and ex.task == task.name
            assert ex.input and 0 < len(ex.output) <= 60
        # Raw draws repeat inputs; a repeated input must always carry the same answer.
        rng = random.Random(3)
        answers = {}
        for _ in range(500):
            text, answer = task.generate(rng)
            assert answers.setdefault(text, answer) == answer


# ---- shipped NI subset and the data spec ------------------------------------------------------


def test_ni_subset_loads_through_the_ni_loader():
    fed = load_ni_subset()
    assert fed.name == "ni-subset"
    assert fed.num_clients == 26 and fed.client_sizes == [24] * 26
    assert [c.name for c in fed.clients] == read_task_list_names("train_tasks.txt")
    assert fed.eval_tasks == tuple(read_task_list_names("test_tasks.txt")) and len(fed.eval_tasks) == 13
    assert [len(v) for v in fed.eval_examples_by_task().values()] == [16] * 13
    assert set(fed.train_tasks).isdisjoint(fed.eval_tasks)
    for ex in fed.eval_examples + tuple(ex for c in fed.clients for ex in c.examples):
        assert ex.instruction and ex.output and len(ex.input) < 1024
    assert load_ni_subset() == fed  # no seed: the same data for every run


def read_task_list_names(split_file):
    with open(os.path.join(NI_SUBSET_DIR, "splits", "default", split_file), encoding="utf-8") as reader:
        return reader.read().split()


def test_ni_subset_ships_only_redistributable_licences():
    names = read_task_list_names("train_tasks.txt") + read_task_list_names("test_tasks.txt")
    assert sorted(os.listdir(os.path.join(NI_SUBSET_DIR, "tasks"))) == sorted(f"{n}.json" for n in names)
    for name in names:
        with open(os.path.join(NI_SUBSET_DIR, "tasks", f"{name}.json"), encoding="utf-8") as reader:
            licences = json.load(reader)["Instance License"]
        assert len(licences) == 1 and ni_subset_build.licence_decision(licences[0])[0], name
    with open(os.path.join(NI_SUBSET_DIR, "README.md"), encoding="utf-8") as reader:
        notice = reader.read()
    assert "not covered by ferret-kernels' MIT licence" in notice and "Apache-2.0" in notice
    assert all(name in notice for name in names)


def test_licence_filter_classifies_every_value_or_refuses():
    assert ni_subset_build.licence_decision("CC BY-SA 4.0") == (True, "attribution, share-alike")
    assert ni_subset_build.licence_decision("OANC")[0]
    assert ni_subset_build.licence_decision("Unknown") == (False, "no licence grant")
    assert not ni_subset_build.licence_decision("CC BY-NC-SA 4.0")[0]
    with pytest.raises(ValueError, match="not classified"):
        ni_subset_build.licence_decision("Custom research licence")


def _write_source(directory, licences):
    rows = {"train": [], "dev": []}
    table = {"train": [], "dev": []}
    commit = "ab" * 20
    for i, (split, licence) in enumerate(licences):
        name = f"task{i:03d}_demo"
        table[split].append(f"| {len(table[split]) + 1} | {name} | Demo | 1 | {commit[:8]} | {licence} |")
        for k in range(3):
            rows[split].append({"task": name, "definition": f"Do {i}.", "input": f"in {k}", "output": f"out {k}",
                                "id": f"{name}-{k}", "category": "Demo"})
    readme = ["# subset", "## Commits read", f"- task files: `{commit}`", "## Selection rule (deterministic)", "- demo",
              "## TRAIN tasks (selection order)", "| # | task | category | pages read | file commit | Instance License |",
              "|---|---|---|---|---|---|", *table["train"], "## DEV tasks (selection order)",
              "| # | task | category | pages read | file commit | Instance License |", "|---|---|---|---|---|---|",
              *table["dev"]]
    (directory / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")
    for split in ("train", "dev"):
        text = "".join(json.dumps(row) + "\n" for row in rows[split])
        (directory / f"{split}.jsonl").write_text(text, encoding="utf-8")


def test_ni_subset_build_filters_and_round_trips_through_the_loader(tmp_path):
    source, target = tmp_path / "source", tmp_path / "shipped"
    source.mkdir()
    _write_source(source, [("train", "MIT"), ("train", "Unknown"), ("train", "CC BY 4.0"), ("dev", "CC BY-NC 4.0"),
                           ("dev", "Apache 2.0")])
    files = ni_subset_build.build(str(source))
    ni_subset_build.write(files, str(target))
    assert files["splits/default/train_tasks.txt"] == "task000_demo\ntask002_demo\n"
    assert files["splits/default/test_tasks.txt"] == "task004_demo\n"
    assert "task001_demo | Unknown | no licence grant" in files["README.md"]
    fed = load_natural_instructions(str(target), min_instances=1, train_fraction=1.0, eval_min_instances=3)
    assert fed.client_sizes == [3, 3] and fed.eval_tasks == ("task004_demo",)
    assert fed.clients[0].examples[1] == Example("Do 0.", "in 1", "out 1", "task000_demo")
    _write_source(source, [("train", "MIT"), ("dev", "Some new licence")])
    with pytest.raises(ValueError, match="Some new licence"):
        ni_subset_build.build(str(source))


@pytest.mark.skipif(not NI_SUBSET_SOURCE, reason="the upstream subset (shared/data/ni-subset) is absent")
def test_shipped_ni_subset_is_what_the_build_script_writes():
    files = ni_subset_build.build(NI_SUBSET_SOURCE)
    for relative, text in files.items():
        with open(os.path.join(NI_SUBSET_DIR, relative), encoding="utf-8") as reader:
            assert reader.read() == text, relative


def test_load_data_dispatches_every_spec(monkeypatch):
    assert load_data("ni-subset") == load_ni_subset()
    assert load_data("synthetic", seed=3) == load_synthetic(seed=3)
    assert load_data(f"dolly:{DOLLY}", seed=5, num_clients=3) == load_dolly(DOLLY, num_clients=3, seed=5)
    assert load_data(f"ni:{NI_ROOT}", seed=1) == load_natural_instructions(NI_ROOT, seed=1)
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: calls.append(a)
                                                                        or _dolly_rows()))
    assert load_data("dolly", num_clients=3, seed=5) == load_dolly(DOLLY, num_clients=3, seed=5)
    assert calls == [("databricks/databricks-dolly-15k",)]
    for bad in ("ni", "ni:", "dolly:", "nisubset", "Synthetic", ""):
        with pytest.raises(ValueError, match="data"):
            load_data(bad)
