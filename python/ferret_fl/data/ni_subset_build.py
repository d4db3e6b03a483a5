"""Build the shipped NI subset (``ferret_fl/data/ni_subset/``) from the curated source subset.

    python -m ferret_fl.data.ni_subset_build --source ../shared/data/ni-subset

The source directory holds ``train.jsonl``, ``dev.jsonl`` (one instance a line: task, definition,
input, output, id, category) and a ``README.md`` whose task tables give each task's commit and
Instance License. This script keeps only the tasks whose instances may be redistributed inside an
MIT package used commercially (:data:`REDISTRIBUTABLE`; no licence grant or a non-commercial
clause drops the task), and writes them in the upstream Natural Instructions layout, so that
``load_natural_instructions`` reads them like a checkout:

    ni_subset/README.md                     attribution, commits, selection, licence filter, counts
    ni_subset/splits/default/train_tasks.txt
    ni_subset/splits/default/test_tasks.txt
    ni_subset/tasks/<task>.json             {"Definition", "Categories", "Input_language",
                                             "Output_language", "Instance License", "Instances"}

Every output byte is a function of the source files, so re-running reproduces the shipped files
(``tests/test_data.py`` checks this when the source is present).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass

from .natural_instructions import NI_SUBSET_DIR

# Instance License values (as written in the task files) whose terms allow redistribution and
# commercial use: permissive licences, public-domain dedications and CC share-alike (which binds
# the shipped instances, not our code, to CC BY-SA). OANC: the Open American National Corpus
# texts may be freely used, modified and shared (MultiNLI's licence statement).
REDISTRIBUTABLE = {
    "Apache 2.0": "permissive",
    "BSD": "permissive",
    "BSD 2-Clause": "permissive",
    "BSD 3-Clause": "permissive",
    "MIT": "permissive",
    "CC0: Public Domain": "public-domain dedication",
    "CC BY 3.0": "attribution",
    "CC BY 4.0": "attribution",
    "CC BY-SA 3.0": "attribution, share-alike",
    "CC BY-SA 4.0": "attribution, share-alike",
    "OANC": "open (OANC: free to use, modify and share)",
}
# Values that are dropped, with the reason. Any value in neither table stops the build: a new
# licence string has to be read and classified by a person, never guessed.
NOT_REDISTRIBUTABLE = {
    "Unknown": "no licence grant",
    "CC BY-NC 4.0": "non-commercial",
    "CC BY-NC-SA 4.0": "non-commercial",
    "CC BY-NC 3.0": "non-commercial",
    "CC BY-NC-SA 3.0": "non-commercial",
}

# | # | task | category | pages read | file commit (8 hex) | Instance License |
_TABLE_ROW = re.compile(
    r"^\|\s*(\d+)\s*\|\s*(task\S+)\s*\|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|\s*([0-9a-f]{8})\s*\|\s*([^|]*?)\s*\|$"
)
_FULL_COMMIT = re.compile(r"\b([0-9a-f]{8})[0-9a-f]{32}\b")


@dataclass(frozen=True)
class SourceTask:
    """One row of the source README's task tables."""

    split: str  # "train" or "dev"
    position: int
    name: str
    category: str
    pages: str
    commit: str  # the full 40-hex commit of the task file
    license: str


def licence_decision(license_name: str) -> tuple[bool, str]:
    """(keep, reason) for an Instance License value; raises ValueError for an unclassified one."""
    if license_name in REDISTRIBUTABLE:
        return True, REDISTRIBUTABLE[license_name]
    if license_name in NOT_REDISTRIBUTABLE:
        return False, NOT_REDISTRIBUTABLE[license_name]
    raise ValueError(
        f"Instance License {license_name!r} is not classified; add it to REDISTRIBUTABLE or "
        "NOT_REDISTRIBUTABLE in ferret_fl/data/ni_subset_build.py after reading its terms"
    )


def parse_source_readme(text: str) -> list[SourceTask]:
    """The TRAIN and DEV task tables of the source README, in table order."""
    full_commits = {match.group(1): match.group(0) for match in _FULL_COMMIT.finditer(text)}
    tasks, split = [], None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].upper()
            split = "train" if heading.startswith("TRAIN TASKS") else "dev" if heading.startswith("DEV TASKS") else None
            continue
        match = _TABLE_ROW.match(line.strip())
        if match and split:
            position, name, category, pages, short, license_name = match.groups()
            if short not in full_commits:
                raise ValueError(f"source README: commit {short} of {name} has no full hash in the text")
            tasks.append(SourceTask(split, int(position), name, category, pages, full_commits[short], license_name))
    if not tasks:
        raise ValueError("source README: no TRAIN/DEV task table rows found")
    return tasks


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as reader:
        return [json.loads(line) for line in reader if line.strip()]


def _task_file(rows: list[dict], task: SourceTask) -> dict:
    definitions = {row["definition"] for row in rows}
    categories = {row["category"] for row in rows}
    if len(definitions) != 1 or len(categories) != 1:
        raise ValueError(f"{task.name}: instances disagree on the definition or category")
    return {
        "Definition": [definitions.pop()],
        "Categories": [categories.pop()],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instance License": [task.license],
        "Instances": [{"id": row["id"], "input": row["input"], "output": [row["output"]]} for row in rows],
    }


def build(source: str) -> dict[str, str]:
    """Relative path -> text of every shipped file, built from the ``source`` directory."""
    with open(os.path.join(source, "README.md"), encoding="utf-8") as reader:
        source_readme = reader.read()
    table = parse_source_readme(source_readme)
    rows = {"train": _read_jsonl(os.path.join(source, "train.jsonl")), "dev": _read_jsonl(os.path.join(source, "dev.jsonl"))}
    files: dict[str, str] = {}
    kept: dict[str, list[tuple[SourceTask, int]]] = {"train": [], "dev": []}
    dropped: dict[str, list[tuple[SourceTask, str]]] = {"train": [], "dev": []}
    for task in table:
        keep, reason = licence_decision(task.license)
        task_rows = [row for row in rows[task.split] if row["task"] == task.name]
        if not task_rows:
            raise ValueError(f"{task.name} is in the source README but has no instance in {task.split}.jsonl")
        if not keep:
            dropped[task.split].append((task, reason))
            continue
        files[f"tasks/{task.name}.json"] = json.dumps(_task_file(task_rows, task), ensure_ascii=False, indent=1) + "\n"
        kept[task.split].append((task, len(task_rows)))
    listed = {task.name for task in table}
    unlisted = sorted({row["task"] for split_rows in rows.values() for row in split_rows} - listed)
    if unlisted:
        raise ValueError(f"tasks with instances but no licence row in the source README: {unlisted}")
    files["splits/default/train_tasks.txt"] = "".join(f"{task.name}\n" for task, _ in kept["train"])
    files["splits/default/test_tasks.txt"] = "".join(f"{task.name}\n" for task, _ in kept["dev"])
    files["README.md"] = _readme(source_readme, kept, dropped)
    return files


def _licence_counts(entries) -> str:
    counts = Counter(task.license for task, _ in entries)
    return ", ".join(f"{name}: {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _section(source_readme: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", source_readme, flags=re.S | re.M)
    if not match:
        raise ValueError(f"source README has no '## {heading}' section")
    return match.group(1).strip()


def _readme(source_readme: str, kept, dropped) -> str:
    n_train = sum(n for _, n in kept["train"])
    n_dev = sum(n for _, n in kept["dev"])
    lines = [
        "# NI subset shipped with ferret-fl (data/ni-subset)",
        "",
        "A small, real subset of Super-NaturalInstructions (Wang et al., 2022, \"Super-NaturalInstructions:",
        "Generalization via Declarative Instructions on 1600+ NLP Tasks\"; github allenai/natural-instructions),",
        "limited to tasks whose instances may be redistributed, including commercially. It is read by",
        "`ferret_fl.data.load_ni_subset()` (data spec `ni-subset`): one federated client per training task,",
        "the test tasks held out for evaluation.",
        "",
        "**Licence.** These files are not covered by ferret-kernels' MIT licence. Task definitions are",
        "Apache-2.0 (the upstream repository's licence for everything but the instances); each task's",
        "instances stay under the licence of the data set they come from, listed per task below and in the",
        "task file's `Instance License` field. CC BY and CC BY-SA tasks require attribution to their",
        "original data sets (each task name names its data set; the upstream task file's `Source` field and",
        "the Super-NaturalInstructions paper give the citation);",
        "CC BY-SA instances, if adapted and shared, must be shared under the same licence.",
        "",
        "## Source",
        "The upstream files were read at these commits (the per-task commit is in the tables below):",
        "",
        _section(source_readme, "Commits read"),
        "",
        "## Selection (upstream subset, quoted from its README)",
        _section(source_readme, "Selection rule (deterministic)"),
        "",
        "Those are the 48 training and 16 test tasks of the upstream subset; the licence filter below keeps",
        f"{len(kept['train'])} and {len(kept['dev'])}. Values are verbatim from the upstream task files (no normalisation);",
        "`output` is `output[0]`. The `#` column below is a task's position in the upstream subset's order.",
        "",
        "## Licence filter (this package)",
        "Built by `python -m ferret_fl.data.ni_subset_build --source <dir of the upstream subset>`, which keeps a",
        "task only when its Instance License allows redistribution and commercial use:",
        "",
        "- kept: " + ", ".join(f"{name} ({why})" for name, why in REDISTRIBUTABLE.items()),
        "- dropped: " + ", ".join(f"{name} ({why})" for name, why in NOT_REDISTRIBUTABLE.items()),
        "- any other value stops the build until a person classifies it.",
        "",
        "OANC: the Open American National Corpus, whose licence lets its texts be freely used, modified and",
        "shared (MultiNLI's licence statement; MultiNLI's fiction genre is CC BY-SA 3.0, CC BY 3.0 or public",
        "domain).",
        "",
        "## Counts",
        "| file | tasks | instances |",
        "|---|---|---|",
        f"| splits/default/train_tasks.txt (clients) | {len(kept['train'])} | {n_train} |",
        f"| splits/default/test_tasks.txt (held out) | {len(kept['dev'])} | {n_dev} |",
        "",
        f"Kept, by licence: train: {_licence_counts(kept['train'])}. dev: {_licence_counts(kept['dev'])}.",
        f"Dropped: train {len(dropped['train'])} tasks ({_licence_counts(dropped['train'])}); "
        f"dev {len(dropped['dev'])} tasks ({_licence_counts(dropped['dev'])}).",
        "",
    ]
    for split, title in (("train", "Training tasks (one client each)"), ("dev", "Held-out tasks (evaluation)")):
        lines += [f"## {title}", "| # | task | category | instances | file commit | Instance License |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {task.position} | {task.name} | {task.category} | {n} | {task.commit[:8]} | {task.license} |"
                  for task, n in kept[split]]
        lines.append("")
    lines += ["## Dropped tasks", "| split | task | Instance License | reason |", "|---|---|---|---|"]
    lines += [f"| {split} | {task.name} | {task.license} | {reason} |"
              for split in ("train", "dev") for task, reason in dropped[split]]
    return "\n".join(lines) + "\n"


def write(files: dict[str, str], target: str = NI_SUBSET_DIR) -> None:
    """Replace ``target`` with exactly ``files`` (stale task files of an earlier build are removed)."""
    tasks_dir = os.path.join(target, "tasks")
    if os.path.isdir(tasks_dir):
        for name in os.listdir(tasks_dir):
            if f"tasks/{name}" not in files:
                os.remove(os.path.join(tasks_dir, name))
    for relative, text in files.items():
        path = os.path.join(target, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as writer:
            writer.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="directory with train.jsonl, dev.jsonl and README.md")
    parser.add_argument("--target", default=NI_SUBSET_DIR, help="output directory (default: the package's ni_subset/)")
    args = parser.parse_args(argv)
    files = build(args.source)
    write(files, args.target)
    n_tasks = sum(1 for name in files if name.startswith("tasks/"))
    print(f"wrote {len(files)} files ({n_tasks} task files) to {args.target}")


if __name__ == "__main__":
    main()
