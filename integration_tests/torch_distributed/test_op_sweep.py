"""Every op of `workers/op_catalogue.py` on DTensors gives one process's
numbers.

One 2-rank launch runs the whole table: each op on replicated, sharded
(unevenly), last-dim-sharded and mixed plain/DTensor inputs, against the
same op on plain tensors, values and input gradients, element by element.

With `KERAS_TORCH_PARITY_REPORT=<file>`, the test also records its results
there for docs/parity.md (see `parity_report`).
"""

import os

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity
from integration_tests.torch_distributed import parity_report

LAYOUTS = ("replicated", "sharded", "sharded_last", "mixed")
REPORT = os.environ.get("KERAS_TORCH_PARITY_REPORT")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("op_sweep")
    _, _, results = launcher.run_workers("op_sweep.py", 2, tmp_path)
    return results


def _ops(result):
    return sorted(
        {k.rsplit("/", 1)[0] for k in result if k.endswith("/family")}
    )


def check_op(results, op):
    """All four layouts of `op` on every rank: no error, the reference's
    values and gradients. Returns `{layout: (max abs difference, share of
    the tolerance used)}`."""
    reference_prefix = f"{op}/reference/"
    reference = {
        k[len(reference_prefix) :]: v
        for k, v in results[0].items()
        if k.startswith(reference_prefix)
    }
    assert "error" not in reference, f"{op} fails in one process: {reference}"
    assert "value0" in reference, op
    rows = {}
    for layout in LAYOUTS:
        worst, used = 0.0, 0.0
        for rank, result in enumerate(results):
            prefix = f"{op}/{layout}/"
            error = result.get(prefix + "error")
            assert error is None, f"rank {rank}: {op} on {layout}: {error}"
            recorded = {
                k[len(prefix) :] for k in result if k.startswith(prefix)
            }
            assert recorded == set(reference), (op, layout, recorded)
            for key, expected in reference.items():
                actual = result[prefix + key]
                parity.assert_close(
                    actual, expected, f"rank {rank} {op} {layout} {key}"
                )
                if actual.dtype.kind == "f":
                    with np.errstate(invalid="ignore"):
                        diff = np.abs(actual.astype("float64") - expected)
                    diff = np.where(actual == expected, 0.0, diff)
                    worst = max(worst, float(np.max(diff, initial=0.0)))
                    used = max(used, parity.tolerance_used(actual, expected))
        rows[layout] = (worst, used)
    return rows


def test_every_op_matches_plain_tensors(results):
    ops = _ops(results[0])
    assert len(ops) >= 180, len(ops)
    families = {str(results[0][f"{op}/family"]) for op in ops}
    expected = {"core", "numpy", "nn", "math", "linalg", "image"}
    assert families == expected, families
    failures, rows = [], {}
    for op in ops:
        try:
            rows[op] = check_op(results, op)
        except AssertionError as error:
            failures.append(f"{op}: {str(error)[:500]}")
    # Gradients reach the inputs of the differentiable ops.
    grads = [k for k in results[0] if "/reference/grad" in k]
    assert len(grads) >= 120, len(grads)
    if REPORT:
        _write_report(rows, failures)
    assert not failures, "\n".join(failures)


def _write_report(rows, failures):
    """Append the rows to the report (see `parity_report`)."""
    for op, layouts in rows.items():
        family, name = op.split("/", 1)
        for layout, (worst, used) in layouts.items():
            parity_report.append(
                REPORT, "ops", layout, family, name, worst, used
            )
    for failure in failures:
        op, _, error = failure.partition(": ")
        family, name = op.split("/", 1)
        parity_report.append(REPORT, "ops", "", family, name, error=error)
