"""Attention with padding and causal masks: the same numbers as one process.

Padded sequences give query rows whose keys are all masked; before NOTE
[attention] in `dtensor_rules`, their gradients differed from one
process's by the size of the gradients, and causal attention failed.
"""

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
    parity.assert_results_match(results, reference, prefixes)
    parity.assert_same_on_every_rank(results, prefixes)
