"""fit / evaluate / predict: the same numbers as one process."""

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

KEYS = [
    "history:",
    "evaluate",
    "predict",
    "weight:",
    "eager",
    "custom_loss",
    "grad:",
    "grad_loss",
]
# The transformer's trainable variables: each gets a gradient (model runs).
TRAINABLE = 22


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
    # The key bias's gradient is rounding noise around zero (softmax ignores
    # a shift shared by all keys); Adam turns noise into steps of at most
    # lr * |g| / eps ~ 1e-5, which differ between runs. Compare it absolutely.
    key_bias = "weight:mha/key/bias"
    skip = []
    if key_bias in reference:
        skip.append(key_bias)
        for result in results:
            diff = np.abs(result[key_bias] - reference[key_bias]).max()
            assert diff < 1e-4, diff
    # Its gradient is exactly zero in exact arithmetic: rounding noise
    # around 1e-10 in both runs, which no relative tolerance can compare.
    grad_key_bias = "grad:mha/key/bias"
    if grad_key_bias in reference:
        skip.append(grad_key_bias)
        for result in [reference, *results]:
            assert np.max(np.abs(result[grad_key_bias])) < 1e-8
        grads = [k for k in reference if k.startswith("grad:")]
        assert len(grads) == TRAINABLE, grads
        for key in grads:
            if key != grad_key_bias:
                assert np.max(np.abs(reference[key])) > 0, key
    parity.assert_results_match(results, reference, KEYS, skip=skip)
    parity.assert_same_on_every_rank(results, KEYS)
