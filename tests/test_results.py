"""README's comparison table is what ``ferret-fl compare --report-only`` makes of the runs kept in
benchmarks/compare-ni-subset: nobody edits a number by hand, and a change to the report that
would change the published table shows here."""

import os
import re
import shutil

from ferret_fl import compare

ROOT = os.path.join(os.path.dirname(__file__), "..")
KEPT = os.path.join(ROOT, "benchmarks", "compare-ni-subset")
README = os.path.join(ROOT, "README.md")
PER_TASK = "Per held-out task"


def _readme_block() -> str:
    with open(README) as f:
        found = re.search(r"<!-- comparison: generated from benchmarks/compare-ni-subset/comparison.md -->\n"
                          r"(.*?)<!-- /comparison -->", f.read(), flags=re.S)
    assert found, "README lost its <!-- comparison --> markers"
    return "\n".join(line for line in found.group(1).splitlines() if not line.startswith("![")).strip()


def test_readme_table_is_the_kept_report():
    with open(os.path.join(KEPT, "comparison.md")) as f:
        kept = f.read()
    assert _readme_block() == kept.split(PER_TASK)[0].strip()


def test_the_kept_report_is_regenerated_from_the_kept_runs(tmp_path):
    copy = str(tmp_path / "compare")
    shutil.copytree(KEPT, copy)
    text = compare.report(copy)
    with open(os.path.join(KEPT, "comparison.md")) as f:
        assert text == f.read()
