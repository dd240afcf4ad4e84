"""Seed bug 3 (`aten.mm` on mixed Tensor/DTensor) and every op like it."""

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity


def test_plain_tensors_meet_sharded_kernel(tmp_path):
    init = str(tmp_path / "init.npz")
    reference = launcher.run_reference(
        "mixed_ops.py", tmp_path, args=["--init", init]
    )
    _, _, results = launcher.run_workers(
        "mixed_ops.py", 2, tmp_path, args=["--init", init]
    )
    # The gradient of a layer norm's input nearly cancels (the norm is
    # invariant to the shift and scale of its input): float32 sums in
    # another order leave a few 1e-5 of the terms that cancelled, whose
    # size is about 1.
    loose = {"grad:layer_norm_layer": (1e-4, 1e-4)}
    count = parity.assert_results_match(
        results, reference, ["value:", "grad:"], loose=loose
    )
    assert count == 34
