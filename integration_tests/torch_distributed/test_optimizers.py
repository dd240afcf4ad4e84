"""Every optimizer: the same weights and slots as one process."""

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

# `optimizer_catalogue.ELEMENTWISE` (kept here: the worker runs apart).
NOT_ELEMENTWISE = ("adafactor", "lamb", "ftrl")
# Steps of `fit` per optimizer: 99 rows in batches of 32.
STEPS = 4


@pytest.mark.parametrize("strategy", ["data", "fsdp", "model"])
def test_optimizers_match_single_process(tmp_path, strategy):
    args = ["--strategy", strategy, "--init", str(tmp_path / "init")]
    reference = launcher.run_reference(
        "optimizer_catalogue.py", tmp_path, args=args
    )
    _, _, results = launcher.run_workers(
        "optimizer_catalogue.py", 2, tmp_path, args=args
    )
    names = [k.split(":")[1] for k in reference if k.startswith("updates:")]
    assert len(names) == 17, names
    for name in names:
        updates = STEPS // 2 if name == "adam_accumulate" else STEPS
        if name in NOT_ELEMENTWISE:
            # Their own `update_step`, variable by variable, on DTensors.
            updates = 0
        # One process has no DTensor: every update runs as upstream's.
        np.testing.assert_array_equal(
            reference[f"updates:{name}"], [0, updates], err_msg=name
        )
        for rank, result in enumerate(results):
            np.testing.assert_array_equal(
                result[f"updates:{name}"],
                [updates, 0],
                err_msg=f"rank {rank} {name}",
            )
    compared = parity.assert_results_match(
        results, reference, ["weight:", "optimizer:"]
    )
    assert compared > 17 * 8, compared
    parity.assert_same_on_every_rank(results, ["weight:", "optimizer:"])
