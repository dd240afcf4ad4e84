"""fit / evaluate / predict: the same numbers as one process."""

import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

KEYS = ["history:", "evaluate", "predict", "weight:"]


@pytest.mark.parametrize(
    "strategy,nproc,mesh",
    [("data", 2, None), ("model", 2, "1,2"), ("model", 4, "2,2")],
)
def test_training_matches_single_process(tmp_path, strategy, nproc, mesh):
    args = ["--strategy", strategy, "--init", str(tmp_path / "init.npz")]
    reference = launcher.run_reference("training.py", tmp_path, args=args)
    if mesh:
        args += ["--mesh", mesh]
    _, _, results = launcher.run_workers(
        "training.py", nproc, tmp_path, args=args
    )
    # Adam divides by sqrt(v) + eps; two epochs amplify the float32 ulp
    # differences of the reduction order to a few 1e-5 in the weights.
    parity.assert_results_match(results, reference, KEYS, rtol=1e-4)
    parity.assert_same_on_every_rank(results, KEYS)
