"""Variables under ModelParallel: shard shapes, gathered values, replicas."""

import numpy as np

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

SHARDED = {"hidden/kernel": 1, "hidden/bias": 0, "out/kernel": 0}


# The standard deviation each initializer gives the (256, 512) kernels.
WIDE_STDDEV = {
    "glorot_uniform": np.sqrt(2 / (256 + 512)),
    "he_normal": np.sqrt(2 / 256),
    "random_normal": 0.05,
}


def test_variables_shards_and_replicas(tmp_path):
    _, _, results = launcher.run_workers("variables.py", 2, tmp_path)
    rank0_draw = results[0]
    for rank, result in enumerate(results):
        paths = [k[len("full:") :] for k in result if k.startswith("full:")]
        assert len(paths) == 8, paths  # 2 kernels, 2 biases, 4 BN vars.
        for path in paths:
            full, local = result[f"full:{path}"], result[f"local:{path}"]
            if path in SHARDED:
                dim = SHARDED[path]
                assert local.shape[dim] == full.shape[dim] // 2, path
                start = rank * local.shape[dim]
                expected = np.take(
                    full, range(start, start + local.shape[dim]), axis=dim
                )
                np.testing.assert_array_equal(local, expected)
            else:
                # Every rank ends up with rank 0's draw, although each rank
                # seeded its generator differently.
                np.testing.assert_array_equal(full, rank0_draw[f"drawn:{path}"])
                np.testing.assert_array_equal(local, full)
        assert bool(result["requires_grad:hidden/kernel"])
        assert not bool(result["requires_grad:bn/moving_mean"])
        # Adam's moments are sharded like their variables (the worker
        # asserts placements and shapes of every slot; here the count and a
        # sharded one).
        slots = [k for k in result if k.startswith("slot_local_shape:")]
        assert len(slots) == 2 * 6, slots  # 2 moments x 6 trainable vars.
        momentum = result["slot_local_shape:adam/hidden_kernel_momentum"]
        assert tuple(momentum) == (8, 8), momentum
        # Seed bug 1: integer variables never require gradients.
        assert int(result["iterations"]) == 2
        assert not bool(result["iterations_requires_grad"])
        assert not bool(result["int_trainable_requires_grad"])
        # Scalars that need no gradient are plain tensors (the worker
        # asserts it), identical on every rank; trainable ones are not.
        assert float(result["scalar:own"]) == 1.0  # Rank 0's value.
        # The tracker counts samples: all 8 of the global batches.
        assert float(result["scalar:loss_count"]) == 8.0
        assert bool(result["scalar_trainable_requires_grad"])
    parity.assert_same_on_every_rank(
        results, ["full:", "wide:", "replicated", "scalar:"]
    )


def test_sharded_variables_are_drawn_shard_by_shard(tmp_path):
    """No rank ever holds a sharded variable in full, even to initialize it.

    Each rank draws its own shard, with the full variable's distribution
    (a variance-scaling initializer uses the full shape's fans) and a seed of
    its own, so the two halves are independent draws.
    """
    _, _, results = launcher.run_workers("variables.py", 2, tmp_path)
    for result in results:
        for initializer, stddev in WIDE_STDDEV.items():
            full = result[f"wide:{initializer}"]
            local_numel = int(result[f"local_numel:{initializer}"])
            assert full.shape == (256, 512)
            assert local_numel == full.size // 2
            largest = int(result[f"largest:{initializer}"])
            if initializer == "he_normal":
                # Keras's truncated normal draws 4 candidates per element
                # (one process draws 4x the full variable).
                assert largest <= 4 * local_numel, largest
            else:
                assert largest <= local_numel, (initializer, largest)
            left, right = full[:, :256], full[:, 256:]
            assert not np.allclose(left, right), initializer
            for half in (left, right):
                # 65536 draws: the sample deviation is within 2% of the
                # true one with overwhelming probability; the fans of the
                # half shape would give 22% more for glorot, 41% for he.
                assert abs(half.std() / stddev - 1) < 0.02, initializer
                assert abs(half.mean()) < 0.02 * stddev * 10, initializer
