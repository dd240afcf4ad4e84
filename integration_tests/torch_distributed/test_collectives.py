"""Collectives per training step: as few as the layouts need.

The worker counts one `train_on_batch` step's collectives on each rank.
Under `DataParallel`, every gradient is reduced exactly once, in one
bucket (the MLP's gradients fill less than a bucket), beside one
all-reduce of the loss's sum over the batch, when it is computed (Keras's
metrics read the global loss; NOTE [scalar results] in
`dtensor_promotion`); a `LossScaleOptimizer` adds none (its finiteness
check once read each gradient before reduction: 15 all-reduces). On a
(1, 2) mesh with Megatron-style layouts, one all-reduce: the
row-parallel layer's output, as tensor parallelism does (the batch axis
has size 1: no gradient reduction).

Nothing else: `train_on_batch` resets the metrics each call, and the
loss tracker's 2 variables are scalars that need no gradient, plain tensors
(NOTE [plain scalars] in `distributed_variable`): the zeros assigned to
them need no broadcast from rank 0, which a plain value assigned to a
replicated DTensor gets.
"""

import pytest

from integration_tests.torch_distributed import launcher

OTHER_KINDS = ("all_gather", "reduce_scatter", "all_to_all")
# The loss's all-reduce takes one scalar: its sum over the batch. What
# Keras computes from it (the division by the batch size, loss scaling)
# runs on plain tensors, each rank alike.
LOSS_SCALARS = 1


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("collectives")
    _, _, results = launcher.run_workers("collectives.py", 2, tmp_path)
    return results


@pytest.mark.parametrize("scenario", ["data", "data_float16"])
def test_data_parallel_reduces_each_gradient_once(results, scenario):
    for rank, result in enumerate(results):
        counts = {k: int(result[f"{scenario}/{k}"]) for k in OTHER_KINDS}
        assert not any(counts.values()), (rank, counts)
        assert result[f"{scenario}/broadcast"] == 0, rank
        # One bucket of gradients and the loss.
        assert result[f"{scenario}/all_reduce"] == 2, (rank, dict(result))
        elements = result[f"{scenario}/all_reduce_elements"]
        parameters = result[f"{scenario}/parameters"]
        assert elements == parameters + LOSS_SCALARS, rank
        # The gradients' bucket comes last, after the loss's.
        last = result[f"{scenario}/last_all_reduce_elements"]
        assert last == parameters, rank


def test_model_parallel_needs_one_all_reduce(results):
    for rank, result in enumerate(results):
        counts = {k: int(result[f"model/{k}"]) for k in OTHER_KINDS}
        assert not any(counts.values()), (rank, counts)
        assert result["model/broadcast"] == 0, rank
        assert result["model/all_reduce"] == 1, (rank, dict(result))
        # The row-parallel output: 16 rows of 4 features.
        assert result["model/all_reduce_elements"] == 16 * 4, rank


def test_fsdp_gathers_each_unit_once(results):
    """One all-gather per unit and dtype in forward, one reduce-scatter of
    its gradients in backward (NOTE [layer gathers]), and the loss's sum.
    The MLP's three layers are small, so they are one unit (NOTE [small
    layers joined]): one pair for the float32 layers, one for the float16
    one."""
    for rank, result in enumerate(results):
        assert result["fsdp/all_gather"] == 2, (rank, dict(result))
        assert result["fsdp/reduce_scatter"] == 2, (rank, dict(result))
        assert result["fsdp/all_reduce"] == LOSS_SCALARS, (rank, dict(result))
        assert result["fsdp/all_to_all"] == 0, rank
        assert result["fsdp/broadcast"] == 0, rank
