"""Every trainable variable of a sharded model gets the reference gradient.

On (1, 2) and (2, 1) here; on (2, 2) in test_training, whose worker records
the same gradients before it trains (one 4-rank launch instead of two).
"""

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity


@pytest.mark.parametrize("nproc,mesh", [(2, "1,2"), (2, "2,1")])
def test_gradients_match_single_process(tmp_path, nproc, mesh):
    init = str(tmp_path / "init.npz")
    reference = launcher.run_reference(
        "gradient_flow.py", tmp_path, args=["--init", init]
    )
    _, _, results = launcher.run_workers(
        "gradient_flow.py",
        nproc,
        tmp_path,
        args=["--init", init, "--mesh", mesh],
    )
    # Softmax ignores a shift shared by all keys, so the key bias's gradient
    # is exactly zero in exact arithmetic: both runs hold rounding noise
    # around 1e-10, which no relative tolerance can compare.
    key_bias = "grad:mha/key/bias"
    assert np.max(np.abs(reference[key_bias])) < 1e-8
    for result in results:
        assert np.max(np.abs(result[key_bias])) < 1e-8
    count = parity.assert_results_match(
        results, reference, ["grad:", "logits", "loss"], skip=[key_bias]
    )
    assert count == 23  # 21 other trainable variables, logits and loss.
    model_axis = int(mesh.split(",")[1])
    for result in results:
        shape = result["local_shape:up/kernel"]
        assert tuple(shape) == (8, 32 // model_axis)
        full = reference["local_shape:mha/query/kernel"]
        np.testing.assert_array_equal(
            result["local_shape:mha/query/kernel"],
            [full[0], full[1] // model_axis, full[2]],
        )
