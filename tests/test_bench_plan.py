"""The benchmark's planner alone: skip rules, process groups and blame, without JAX."""

import subprocess
import sys
from pathlib import Path

import pytest

from subspace_jax.bench._plan import (
    WORKING_FACTOR,
    Cell,
    CellFacts,
    Limits,
    Work,
    budget_bytes,
    cell_seconds,
    group_cells,
    plan_cells,
    settle,
)

PLAN = Path(__file__).resolve().parents[1] / "subspace_jax" / "bench" / "_plan.py"
GiB = 2**30


def facts(name, d):
    """A made-up registry: 'small' allows d <= 50 and holds 1 GiB per 10 d; 'slow' costs 1 s a
    step per unit of d."""
    if name == "slow":
        return CellFacts(1000, 1, Work("stored", d * 1e9 / 1.5))
    return CellFacts(50, d * GiB // 10, Work("hash", 1.0))


LIMITS = Limits(
    budget=6 * GiB, max_cell_seconds=60.0, dim_caps={"small": 40}, steps=5, warmup=2, backend="cpu"
)


def test_the_planner_module_needs_no_jax():
    """Loaded by path with ``import jax`` made to fail: the planner imports nothing of JAX (nor
    of the package, whose ``__init__`` imports JAX), and plans."""
    code = f"""
import importlib.util, sys
sys.modules["jax"] = None  # any `import jax` now raises ImportError
spec = importlib.util.spec_from_file_location("bench_plan", {str(PLAN)!r})
plan = importlib.util.module_from_spec(spec)
sys.modules["bench_plan"] = plan
spec.loader.exec_module(plan)
limits = plan.Limits(10**9, None, {{}}, 1, 1, "cpu")
facts = lambda name, d: plan.CellFacts(8, 4 * d, plan.Work("hash", 1.0))
cells = plan.plan_cells(["a"], [4, 9], 8, facts, limits)
assert [c.skipped is None for c in cells] == [True, False], cells
assert sys.modules["jax"] is None  # never replaced by the real package
assert not [m for m in sys.modules if m.startswith(("jax.", "jaxlib", "subspace_jax"))]
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_each_skip_reason_in_order_of_precedence():
    cells = plan_cells(["small", "slow"], [10, 45, 60, "full"], 100, facts, LIMITS)
    got = {(c.projection, c.dim): c.skipped for c in cells}
    assert [(c.projection, c.dim) for c in cells] == [
        (p, d) for p in ("small", "slow") for d in (10, 45, 60, 100)
    ]
    assert got["small", 10] is None  # 3 x 1 GiB fits 6 GiB, 1 unit of work is fast
    assert got["small", 45] == "not run: this grid runs 'small' only up to d = 40"
    assert got["small", 60].startswith("d = 60 is out of range for D = 100")
    assert "allowed 1..50" in got["small", 100]
    assert got["slow", 10].startswith("too slow on CPU: estimated 10.0s/step")


def test_fit_is_working_factor_times_state():
    limits = LIMITS._replace(budget=WORKING_FACTOR * 2 * GiB)  # fits d <= 20 exactly
    cells = plan_cells(["small"], [19, 20, 21], 100, facts, limits)
    assert [c.skipped is None for c in cells] == [True, True, False]
    assert cells[2].skipped == (
        f"does not fit: {WORKING_FACTOR} x state 2.10 GiB = 6.30 GiB > budget 6.00 GiB"
    )


def test_cost_model_against_hand_arithmetic():
    # stored on CPU: 1.5 ns a step per unit, 5 s fixed setup + 60 ns per unit; 5 s overhead.
    step_s, cell_s = cell_seconds(Work("stored", 1e9, 0.0), steps=5, warmup=2)
    assert step_s == pytest.approx(1.5)
    assert cell_s == pytest.approx(5.0 + 5.0 + 60.0 + 7 * 1.5)
    assert cell_seconds(Work("", 0.0), steps=1, warmup=1) is None


def test_groups_one_process_per_cell_or_per_projection_by_ascending_d():
    cells = [Cell("a", 4, None), Cell("a", 2, None), Cell("b", 8, "x"), Cell("a", 3, None)]
    assert group_cells(cells, "cell") == [[cells[0]], [cells[1]], [cells[3]]]
    assert group_cells(cells, "projection") == [[cells[1], cells[3], cells[0]]]
    assert group_cells([Cell("b", 8, "x")], "none") == []


def test_the_first_cell_without_a_result_is_blamed_the_rest_run_again():
    group = [Cell("a", 2, None), Cell("a", 3, None), Cell("a", 4, None)]
    got = [{"kind": "cell", "projection": "a", "dim": 2, "ratio": 2.0}]
    done, still = settle(group, got, "process killed by SIGKILL")
    assert done == [(group[0], {"projection": "a", "dim": 2, "ratio": 2.0}),
                    (group[1], {"skipped": "process killed by SIGKILL"})]  # fmt: skip
    assert still == [group[2]]
    done, still = settle(group[2:], [], None)
    assert done == [(group[2], {"skipped": "the process ended without a result"})] and not still


def test_budget_is_the_given_bytes_or_a_fraction_of_the_available():
    direct = {"available_memory_bytes": 1000, "backend": "cpu"}
    assert budget_bytes(123, direct, 5000, 0.5) == 123
    assert budget_bytes(None, direct, 5000, 0.5) == 2500  # the host's, on CPU
    assert budget_bytes(None, direct, None, 0.5) == 500
    assert budget_bytes(None, {**direct, "backend": "gpu"}, 5000, 0.5) == 500
