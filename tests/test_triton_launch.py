"""The Triton backend's host side and its compile audit, without running kernels on a GPU.

Launch preparation must produce only kernel variants the audit compiles (whatever the
seeds, offsets, dtypes and layout), cache its layout work, and keep work rows and
partial-sum runs consistent; the audit's scanners must flag what they are for.
"""

import pytest
import torch

pytest.importorskip("triton")

import ferret_kernels as fk  # noqa: E402
from ferret_kernels import functional, layout  # noqa: E402
from ferret_kernels.backends.triton import audit, basis, generate, project, reconstruct  # noqa: E402

CPU = torch.device("cpu")
SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**63, 2**64 - 1]


def _launches(dtypes, sizes, counts, seed, dist, offset_numels=None):
    tensors = [torch.empty(n, dtype=dt) for n, dt in zip(offset_numels or [sum(sizes)], dtypes, strict=True)]
    views = layout.flat_views(tensors, "x")
    lay = layout.BlockLayout.build(sizes, counts)
    cut = functional._cut(lay, views)
    out = project.prepare(views, cut, lay, seed, dist)[0]
    out += reconstruct.prepare(views, cut, [lay, lay.shifted(lay.total_count)], torch.zeros(2 * lay.total_count),
                               [seed, seed ^ 1], -0.5, dist, device=CPU)
    return out


@pytest.fixture(scope="module")
def audited():
    return {audit.variant_key(v.launch) for v in audit.variants()}


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_every_launch_is_an_audited_variant(audited, dist):
    """Seeds on both sides of 2**31 and 2**63, element offsets past 2**32, mixed dtypes,
    aligned and unaligned segments: never a variant the audit has not compiled."""
    seen = set()
    for seed in SEEDS:
        for dtypes, numels in (([torch.float32], None), ([torch.bfloat16, torch.float16, torch.float32], [5, 4099, 12])):
            launches = _launches(dtypes, [3, 4097, 16], [2, 9, 1], seed, dist, numels)
            seen |= {audit.variant_key(launch) for launch in launches}
        seen |= {audit.variant_key(launch) for launch in basis.prepare(seed, 3, 7, 2**32 - 1, 2**40 + 3, 5, dist,
                                                                       CPU)[0]}
        seen |= {audit.variant_key(launch) for launch in generate.prepare(seed, 3, 4097, dist, CPU)[0]}
    assert seen <= audited, seen - audited


def test_seeds_never_change_the_compiled_variant():
    keys = {tuple(audit.variant_key(launch) for launch in _launches([torch.bfloat16], [64, 64], [3, 5], seed,
                                                                      "gaussian")) for seed in SEEDS}
    assert len(keys) == 1


def test_the_audit_covers_every_dtype_distribution_and_alignment():
    labels = {v.label for v in audit.variants()}
    for op in ("project", "reconstruct"):
        for dtype in ("float32", "bfloat16", "float16"):
            assert {f"{op} {dtype} gaussian", f"{op} {dtype} gaussian aligned", f"{op} {dtype} rademacher"} <= labels
        assert f"project {dtype} rademacher aligned" in labels
    assert {"sum_runs", "basis gaussian", "basis rademacher", "generate_sum gaussian", "generate_sum rademacher"} <= labels


def test_layout_work_is_cached_per_layout():
    x = [torch.randn(300), torch.randn(700)]
    lay = layout.BlockLayout.build([500, 500], [3, 4])
    assert layout.BlockLayout.build([500, 500], [3, 4]) is lay
    views = layout.flat_views(x, "x")
    cut = functional._cut(lay, views)
    assert functional._cut(lay, views) is cut
    project.prepare(views, cut, lay, 5, "gaussian")
    cols = cut.derived[("triton", project.SHAPES["gaussian"].tile, "cpu")]
    project.prepare(views, cut, lay, 6, "gaussian")
    assert cut.derived[("triton", project.SHAPES["gaussian"].tile, "cpu")] is cols


def test_project_rows_and_runs_partition_the_partial_sums():
    """Every (segment, tile, basis group) item owns one partial row, and the sum runs
    cover each row exactly once, a run per (block, group) with the block's items."""
    x = [torch.randn(1500), torch.randn(3000).to(torch.bfloat16)]
    views = layout.flat_views(x, "x")
    lay = layout.BlockLayout.build([1100, 2, 3398], [17, 0, 9])
    launches, gamma = project.prepare(views, functional._cut(lay, views), lay, 3, "gaussian")
    table = launches[0].args[0]
    rows_used = []
    for launch in launches[:-1]:
        _, _, _, partial, rows_at, n_rows, _, _ = launch.args
        rows = table[rows_at:rows_at + n_rows * project.ROW.value].reshape(n_rows, project.ROW.value)
        items = torch.cat([rows[1:, 2], torch.tensor([launch.grid[0]])]) - rows[:, 2]
        for row, n in zip(rows.tolist(), items.tolist(), strict=True):
            rows_used += range(row[4], row[4] + n)
    assert sorted(rows_used) == list(range(partial.shape[0]))
    runs_at = launches[-1].args[3]
    runs = table[runs_at:runs_at + 4 * launches[-1].grid[0]].reshape(-1, 4)
    covered = [r for begin, end, _, _ in runs.tolist() for r in range(begin, end)]
    assert sorted(covered) == list(range(partial.shape[0]))
    assert runs[:, 3].sum() == lay.total_count


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_aligned_and_unaligned_groups_write_the_same_bits(dist):
    """One call whose gaussian segments split into an aligned (vector) group and an
    unaligned one gives the torch backend's bits on both."""
    from helpers import assert_bitwise

    x = torch.randn(4096 + 7)
    sizes, counts = [2048, 5, 2050], [3, 2, 4]
    views = layout.flat_views(x, "x")
    lay = layout.BlockLayout.build(sizes, counts)
    groups = {launch.constexprs["ALIGNED"] for launch in reconstruct.prepare(
        views, functional._cut(lay, views), [lay], torch.zeros(9), [1], 1.0, dist)}
    assert groups == ({False, True} if dist == "gaussian" else {False})
    gamma = torch.randn(sum(counts))
    a, b = x.clone(), x.clone()
    fk.reconstruct_blocks_(a, sizes, counts, gamma, 2**63 + 1, distribution=dist, backend="triton")
    fk.reconstruct_blocks_(b, sizes, counts, gamma, 2**63 + 1, distribution=dist, backend="torch")
    assert_bitwise(a, b)


@pytest.mark.parametrize("lane_per_call", [True, False])
def test_rademacher_project_aligned_and_unaligned_groups_match_float64(monkeypatch, lane_per_call):
    """Rademacher project keeps one Philox call per lane on aligned segments and hands words
    over on the others (on every segment without LANE_PER_CALL, as the tuner compares):
    both give the float64 projection, over several tiles, a partial tile, a block that
    spans two tensors (a segment starting at j0 = 3000) and odd blocks."""
    from helpers import dense_basis

    monkeypatch.setattr(project, "LANE_PER_CALL", lane_per_call)
    xs = [torch.randn(3000, dtype=torch.float64), torch.randn(3165, dtype=torch.float64)]
    sizes, counts = [4100, 8, 2052, 5], [17, 3, 9, 2]
    views = layout.flat_views([x.float() for x in xs], "x")
    lay = layout.BlockLayout.build(sizes, counts)
    launches, _ = project.prepare(views, functional._cut(lay, views), lay, 7, "rademacher")
    assert {launch.constexprs.get("ALIGNED") for launch in launches if launch.kernel is project._project_kernel} \
        == ({False, True} if lane_per_call else {False})
    got = fk.project_blocks([x.float() for x in xs], sizes, counts, 7, distribution="rademacher", backend="triton")
    flat, start, want = torch.cat([x.float().double() for x in xs]), 0, []
    for b, (s, c) in enumerate(zip(sizes, counts, strict=True)):
        want.append(dense_basis(7, c, s, block=b, distribution="rademacher") @ flat[start:start + s])
        start += s
    want = torch.cat(want)
    assert float((got.double() - want).norm() / want.norm()) <= 1e-6


# ----------------------------------------------------------------------------------
# The audit's scanners on known text (the compiled self-test runs in make gpu-audit).

def test_ptx_findings_flag_approximate_contracted_and_unrounded_float_ops():
    ptx = """
        fma.rn.f32 %f1, %f2, %f3, %f4;
        mad.lo.s32 %r1, %r2, %r3, %r4;
        div.full.f32 %f5, %f6, %f7;
        sqrt.approx.ftz.f32 %f8, %f9;
        sqrt.rn.f32 %f8, %f9;
        @%p1 add.f32 %f1, %f2, %f3;
        add.rn.f32 %f1, %f2, %f3;
        mul.rn.f32 %f1, %f2, %f3;
    """
    found = " ".join(audit.ptx_findings(ptx))
    assert "fma.rn.f32" in found and "div.full.f32" in found and "sqrt.approx.ftz.f32" in found
    assert "without .rn x1" in found
    assert "mad.lo.s32" not in found and "sqrt.rn" not in found
    assert "mul.hi.u64" in " ".join(audit.ptx_findings("mul.hi.u64 %rd1, %rd2, %rd3;"))
    assert audit.ptx_findings("add.rn.f32 %f1, %f2, %f3;\nmul.wide.u32 %rd1, %r1, %r2;\nmul.hi.u32 %r1, %r2, %r3;") == []


def _sass(lines: list[str]) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))


# A search loop with address products (0x10-0x30), a Philox loop (0x40-0x160) inside
# an outer loop (0x40-0x180), and a register spill.
SASS = _sass(["MOV R1, c[0x0][0x28]", "IMAD.WIDE.U32 R2, R3, R4, RZ", "IADD3 R5, R5, 0x1, RZ", "@!P0 BRA 0x10"]
             + ["IMAD.HI.U32 R2, R3, R4, RZ"] * audit.PHILOX_PRODUCTS
             + ["FADD R5, R5, R6", "@P1 BRA 0x40", "STL [R1], R2", "@P2 BRA 0x40", "EXIT"])


def test_sass_findings_flag_spills_and_hot_loop_is_the_smallest_philox_loop():
    assert any("STL" in f for f in audit.sass_findings(SASS, {"REG": 40, "STACK": 0, "LOCAL": 0}))
    assert audit.sass_findings("/*0000*/ FADD R1, R2, R3 ;", {"REG": 40, "STACK": 0, "LOCAL": 0}) == []
    assert any("stack" in f for f in audit.sass_findings("", {"STACK": 16, "LOCAL": 0}))
    assert audit.hot_loop(SASS) == {"IMAD.HI.U32": audit.PHILOX_PRODUCTS, "FADD": 1, "BRA": 1}
