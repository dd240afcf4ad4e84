"""Every layer of `workers/layer_catalogue.py` gives one process's numbers.

Three launches run the whole table: the single-process reference, 2 ranks
(every case under `DataParallel`, then under `ModelParallel` on (1, 2)),
and 4 ranks (the cases marked `grid` on a (2, 2) mesh). Each case's
inference output, training output, loss, gradients of its float inputs and
of every trainable variable, and its weights and loss after one `fit` step
are compared element by element with the reference. The inference output
and the training pass are compared twice: on DTensors, and with row-wise
layers run on local tensors (NOTE [local calls]), which every case with
such a layer must do under `DataParallel`.

With `KERAS_TORCH_PARITY_REPORT=<file>`, the test also records its results
there for docs/parity.md (see `parity_report`).
"""

import os

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity
from integration_tests.torch_distributed import parity_report

WORKER = "layer_sweep.py"
TIMEOUT = 600
REPORT = os.environ.get("KERAS_TORCH_PARITY_REPORT")
# Recorded per case, not compared with the reference.
NOT_COMPARED = (
    "/seconds",
    "/family",
    "/local_expected",
    "/local_missed",
)
# Row-wise layers that run on DTensors, by case: these lookup layers
# compute with TensorFlow and return the whole batch as a plain tensor, not
# batch-sharded, so the `Embedding` after them is not called locally.
NOT_LOCAL = {"Hashing": "emb", "IntegerLookup": "emb"}
# Each strategy's column in the report, and its number of ranks.
STRATEGIES = {
    "data": ("DataParallel, 2 ranks", 2),
    "model": ("ModelParallel (1, 2)", 2),
    "grid": ("ModelParallel (2, 2)", 4),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("layer_sweep")
    init = ["--init", str(tmp_path / "init")]
    reference = launcher.run_reference(
        WORKER, tmp_path, args=init, timeout=TIMEOUT
    )
    distributed = {}
    for nproc, strategies in ((2, "data,model"), (4, "grid")):
        _, _, results = launcher.run_workers(
            WORKER,
            nproc,
            tmp_path,
            args=init + ["--strategies", strategies],
            timeout=TIMEOUT,
        )
        for strategy in strategies.split(","):
            distributed[strategy] = results
    return reference, distributed


def _cases(reference):
    return sorted({key.split("/")[0] for key in reference})


def _compared_keys(reference, case):
    return [
        key
        for key in reference
        if key.startswith(f"{case}/") and not key.endswith(NOT_COMPARED)
    ]


def check_case(results, reference, strategy, case):
    """One case under one strategy: no error, the reference's keys, close
    values, the same values on every rank. Returns the worst absolute
    difference and share of the tolerance used."""
    prefix = f"{strategy}/{case}/"
    for rank, result in enumerate(results):
        error = result.get(prefix + "error")
        assert error is None, f"rank {rank}: {strategy} {case}: {error}"
    keys = _compared_keys(reference, case)
    recorded = {
        key[len(strategy) + 1 :]
        for key in results[0]
        if key.startswith(prefix) and not key.endswith(NOT_COMPARED)
    }
    assert recorded == set(keys), (strategy, case, recorded ^ set(keys))
    worst, used = 0.0, 0.0
    for rank, result in enumerate(results):
        for key in keys:
            actual = result[f"{strategy}/{key}"]
            parity.assert_close(
                actual, reference[key], f"rank {rank} {strategy} {key}"
            )
            difference = np.abs(actual.astype("float64") - reference[key])
            worst = max(worst, float(np.max(difference, initial=0.0)))
            used = max(used, parity.tolerance_used(actual, reference[key]))
    for rank, result in enumerate(results[1:], start=1):
        for key in keys:
            np.testing.assert_array_equal(
                result[f"{strategy}/{key}"],
                results[0][f"{strategy}/{key}"],
                err_msg=f"rank {rank} and rank 0 differ: {strategy} {key}",
            )
    return worst, used


def test_reference_runs_every_case(runs):
    """Every case works in one process and can show a difference: a non-zero
    output and at least one non-zero gradient."""
    reference, _ = runs
    for case in _cases(reference):
        assert f"{case}/error" not in reference, reference.get(f"{case}/error")
        assert np.any(reference[f"{case}/train_out"] != 0), case
        grads = [k for k in reference if k.startswith(f"{case}/grad")]
        assert any(np.any(reference[k] != 0) for k in grads), case


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_layer_matches_single_process(runs, strategy):
    reference, distributed = runs
    results = distributed[strategy]
    cases = [
        c for c in _cases(reference) if f"{strategy}/{c}/seconds" in results[0]
    ]
    assert len(cases) >= (10 if strategy == "grid" else 100), cases
    failures, rows = [], {}
    for case in cases:
        try:
            rows[case] = check_case(results, reference, strategy, case)
        except AssertionError as error:
            failures.append(f"{case}: {str(error)[:500]}")
    if REPORT:
        _write_report(strategy, reference, rows, failures)
    assert not failures, "\n".join(failures)


def test_row_wise_layers_run_on_local_tensors(runs):
    """Under `DataParallel`, every row-wise layer of every case (the case's
    own layer, and the `Dense` head) ran on local tensors (NOTE [local
    calls]), on every rank, but those of `NOT_LOCAL`."""
    reference, distributed = runs
    cases = _cases(reference)
    for rank, results in enumerate(distributed["data"]):
        row_wise = {
            case: int(results[f"data/{case}/local_expected"]) for case in cases
        }
        # Every case has a `Dense` head; most have a row-wise layer of
        # their own before it.
        assert min(row_wise.values()) >= 1, row_wise
        assert sum(n >= 2 for n in row_wise.values()) >= 40, row_wise
        missed = {
            case: str(results[f"data/{case}/local_missed"])
            for case in cases
            if str(results[f"data/{case}/local_missed"])
            != NOT_LOCAL.get(case, "")
        }
        assert not missed, (rank, missed)


def _write_report(strategy, reference, rows, failures):
    """Append one strategy's rows to the report (see `parity_report`)."""
    for case, (worst, used) in rows.items():
        family = str(reference[f"{case}/family"])
        parity_report.append(
            REPORT, "layers", STRATEGIES[strategy][0], family, case, worst, used
        )
    for failure in failures:
        case, _, error = failure.partition(": ")
        parity_report.append(
            REPORT, "layers", STRATEGIES[strategy][0], "", case, error=error
        )
