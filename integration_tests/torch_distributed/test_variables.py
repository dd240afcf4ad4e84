"""Variables under ModelParallel: shard shapes, gathered values, replicas."""

import numpy as np

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

SHARDED = {"hidden/kernel": 1, "hidden/bias": 0, "out/kernel": 0}


def test_variables_shards_and_replicas(tmp_path):
    _, _, results = launcher.run_workers("variables.py", 2, tmp_path)
    rank0_draw = results[0]
    for rank, result in enumerate(results):
        paths = [k[len("full:") :] for k in result if k.startswith("full:")]
        assert len(paths) == 8, paths  # 2 kernels, 2 biases, 4 BN vars.
        for path in paths:
            full, local = result[f"full:{path}"], result[f"local:{path}"]
            # Every rank ends up with rank 0's draw, although each rank
            # seeded its generator differently.
            np.testing.assert_array_equal(full, rank0_draw[f"drawn:{path}"])
            if path in SHARDED:
                dim = SHARDED[path]
                assert local.shape[dim] == full.shape[dim] // 2, path
                start = rank * local.shape[dim]
                expected = np.take(
                    full, range(start, start + local.shape[dim]), axis=dim
                )
                np.testing.assert_array_equal(local, expected)
            else:
                np.testing.assert_array_equal(local, full)
        assert bool(result["requires_grad:hidden/kernel"])
        assert not bool(result["requires_grad:bn/moving_mean"])
        # Seed bug 1: integer variables never require gradients.
        assert int(result["iterations"]) == 2
        assert not bool(result["iterations_requires_grad"])
        assert not bool(result["int_trainable_requires_grad"])
    parity.assert_same_on_every_rank(results, ["full:"])
