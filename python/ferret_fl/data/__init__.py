"""Federated instruction-tuning data: Dolly-15K, Natural Instructions v2.8, the shipped
Super-NaturalInstructions subset and an offline synthetic NI-style benchmark, all returned as a
:class:`FederatedDataset`, plus Alpaca prompts, masked tokenization and collation.

    fed = load_data("ni-subset")                      # or "synthetic", "dolly[:file]", "ni:<dir>"
    client = fed.clients[0]                           # ClientData(name, examples)
    items = tokenize_examples(client.examples, tokenizer, max_length=1024)
    loader = DataLoader(items, batch_size=4, shuffle=True, collate_fn=Collator(tokenizer.pad_token_id))
    prompts = [tokenize_prompt(ex, tokenizer) for ex in fed.eval_examples]   # for generation
"""

from .dolly import DOLLY_CATEGORIES, DOLLY_HUB_ID, category_codes, load_dolly, read_dolly_hub, read_dolly_jsonl
from .natural_instructions import (
    NI_SUBSET_DIR,
    eval_cap,
    load_natural_instructions,
    load_ni_subset,
    read_task,
    read_task_list,
)
from .partition import dirichlet_label_split, named_rng
from .prompts import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    DEFAULT_MAX_LENGTH,
    IGNORE_INDEX,
    Collator,
    TokenizedExample,
    collate,
    collate_prompts,
    format_prompt,
    tokenize_example,
    tokenize_examples,
    tokenize_prompt,
)
from .spec import DATA_SPECS, load_data
from .synthetic import (
    DEFAULT_HELDOUT_TASKS,
    TASKS,
    TASKS_BY_NAME,
    SyntheticTask,
    generate_instances,
    load_synthetic,
    number_to_words,
)
from .types import ClientData, Example, FederatedDataset

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DATA_SPECS",
    "DEFAULT_HELDOUT_TASKS",
    "DEFAULT_MAX_LENGTH",
    "DOLLY_CATEGORIES",
    "DOLLY_HUB_ID",
    "IGNORE_INDEX",
    "NI_SUBSET_DIR",
    "TASKS",
    "TASKS_BY_NAME",
    "ClientData",
    "Collator",
    "Example",
    "FederatedDataset",
    "SyntheticTask",
    "TokenizedExample",
    "category_codes",
    "collate",
    "collate_prompts",
    "dirichlet_label_split",
    "eval_cap",
    "format_prompt",
    "generate_instances",
    "load_data",
    "load_dolly",
    "load_natural_instructions",
    "load_ni_subset",
    "load_synthetic",
    "named_rng",
    "number_to_words",
    "read_dolly_hub",
    "read_dolly_jsonl",
    "read_task",
    "read_task_list",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_prompt",
]
