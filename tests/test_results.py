"""README's comparison table is what ``ferret-fl compare --report-only`` makes of the runs kept in
benchmarks/compare-ni-subset: nobody edits a number by hand, and a change to the report that
would change the published table shows here."""

import os
import shutil

from ferret_fl import compare

ROOT = os.path.join(os.path.dirname(__file__), "..")
KEPT = os.path.join(ROOT, "benchmarks", "compare-ni-subset")
README = os.path.join(ROOT, "README.md")


def test_readme_table_is_the_kept_report():
    with open(os.path.join(KEPT, "comparison.md")) as f:
        kept = f.read()
    with open(README) as f:
        readme = f.read()
    block = compare.readme_block(KEPT, README, kept)
    assert block in readme, ("README's comparison block is not the kept report: run `ferret-fl compare --output-dir "
                             "benchmarks/compare-ni-subset --report-only --readme README.md`")


def test_the_kept_report_is_regenerated_from_the_kept_runs(tmp_path):
    copy = str(tmp_path / "compare")
    shutil.copytree(KEPT, copy)
    text = compare.report(copy)
    with open(os.path.join(KEPT, "comparison.md")) as f:
        assert text == f.read()
