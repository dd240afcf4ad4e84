"""Every optimizer: the same weights and slots as one process."""

import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

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
    names = [k.split(":")[1] for k in reference if k.startswith("iterations:")]
    assert len(names) == 17, names
    for name in names:
        # Accumulating over 2 batches, Adam counts the updates it applied.
        steps = STEPS // 2 if name == "adam_accumulate" else STEPS
        for rank, result in enumerate([reference, *results]):
            count = result[f"iterations:{name}"]
            assert count == steps, (name, rank - 1, count)
    compared = parity.assert_results_match(
        results, reference, ["weight:", "optimizer:"]
    )
    assert compared > 17 * 8, compared
    parity.assert_same_on_every_rank(results, ["weight:", "optimizer:"])
