"""Shuffled data with each rank seeded differently: the same batches on
every rank, or a clear error on every rank (NOTE [same batches])."""

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity


def test_shuffled_batches_agree_across_ranks(tmp_path):
    args = ["--init", str(tmp_path / "init.npz")]
    reference = launcher.run_reference("shuffled.py", tmp_path, args=args)
    _, _, results = launcher.run_workers("shuffled.py", 2, tmp_path, args=args)
    compared = parity.assert_results_match(
        results, reference, ["history:", "weight:"]
    )
    assert compared == 2 + 8, compared  # 2 histories, 8 weights.
    parity.assert_same_on_every_rank(results, ["history:", "weight:"])


def test_batches_that_differ_fail_on_every_rank(tmp_path):
    returncode, output, _ = launcher.run_workers(
        "shuffled.py",
        2,
        tmp_path,
        args=["--case", "batch"],
        expect_success=False,
        timeout=120,
    )
    assert returncode != 0
    launcher.assert_every_rank_printed(
        output, "the first batch of this epoch differs"
    )
