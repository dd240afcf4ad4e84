"""Attention with padding and causal masks: the same numbers as one process.

Padded sequences give query rows whose keys are all masked; before NOTE
[attention] in `dtensor_rules`, their gradients differed from one
process's by the size of the gradients, and causal attention failed.
"""

import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

KEYS = ("out", "grad:", "grad_loss", "history:", "weight:", "predict")


@pytest.mark.parametrize(
    "strategy,nproc,mesh",
    [("data", 2, None), ("model", 2, "1,2"), ("model", 4, "2,2")],
)
def test_attention_matches_single_process(tmp_path, strategy, nproc, mesh):
    args = ["--strategy", strategy, "--init", str(tmp_path / "init")]
    reference = launcher.run_reference("attention.py", tmp_path, args=args)
    if mesh:
        args += ["--mesh", mesh]
    _, _, results = launcher.run_workers(
        "attention.py", nproc, tmp_path, args=args, timeout=420
    )
    prefixes = [
        f"{s}/{k}"
        for s in ("mask_zero", "explicit", "causal", "causal_only")
        for k in KEYS
    ]
    # Softmax ignores a shift shared by all keys: the key bias's gradient
    # is zero in exact arithmetic, rounding noise (about 1e-7) in both
    # runs, which Adam turns into steps of up to lr * |g| / eps. Compared
    # absolutely.
    key_bias = [k for k in reference if "mha/key/bias" in k]
    for key in key_bias:
        for result in results:
            assert np.abs(result[key] - reference[key]).max() < 1e-4, key
    parity.assert_results_match(results, reference, prefixes, skip=key_bias)
    parity.assert_same_on_every_rank(results, prefixes)
