"""DataParallel: the same numbers as one process, whatever the input."""

import numpy as np

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

SCENARIOS = [
    "arrays",
    "class_weights",
    "nonlinear_loss",
    "loss_scale",
    "own_compute_loss",
    "py_dataset",
    "data_loader",
    "distributed_sampler",
    "generator",
    "custom_loop",
    "accumulate",
]
# A bias followed by BatchNormalization has a gradient of exactly zero (the
# normalization removes any shift), so both runs hold rounding noise there,
# which Adam turns into steps of at most lr * |g| / eps ~ 1e-5.
NOISE = "weight:hidden/bias"


def test_every_input_matches_single_process(tmp_path):
    args = ["--init", str(tmp_path / "init")]
    reference = launcher.run_reference("data_parallel.py", tmp_path, args)
    # Buckets of 0 MB: every gradient is its own bucket, reduced in place
    # during backward (the path of large gradients), and gradient
    # accumulation adds a second backward's gradients to reduced ones.
    _, output, results = launcher.run_workers(
        "data_parallel.py",
        2,
        tmp_path,
        args=args,
        env={"KERAS_TORCH_GRADIENT_BUCKET_MB": "0"},
    )
    for name in SCENARIOS:
        prefix = f"{name}/"
        noise = prefix + NOISE
        for result in results:
            diff = np.abs(result[noise] - reference[noise]).max()
            assert diff < 1e-4, (noise, diff)
        count = parity.assert_results_match(
            results, reference, [prefix], skip=[noise]
        )
        assert count >= 9, (name, count)
    parity.assert_same_on_every_rank(results, [""])
    # Metrics that count (true positives, false negatives) are integers:
    # equal, not merely close, to the reference.
    for result in results:
        for key in ("arrays/history:tp", "arrays/history:fn"):
            np.testing.assert_array_equal(result[key], reference[key])
    # The fork itself warns of nothing: its local calls wrapped outputs that
    # required grad as DTensors, which DTensor warned about once a rank.
    assert "To construct DTensor" not in output, output
    # Progress bars (fit with verbose=2, predict's default) print on rank 0
    # only.
    progress = [line for line in output.splitlines() if "/step" in line]
    assert len(progress) >= 2, output
    assert all(line.startswith("[default0]") for line in progress), progress
