"""Each process picks its own GPU, whoever formed the world.

The machines the suite runs on have no GPU, so CUDA is faked: the test
checks which device `process_group.use_local_cuda_device` selects.
"""

import pytest


@pytest.fixture
def process_group(monkeypatch):
    pytest.importorskip("torch.distributed")
    from keras.src.backend.torch import process_group

    chosen = []
    monkeypatch.setattr(process_group.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(process_group.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(
        process_group.torch.cuda,
        "set_device",
        lambda index: chosen.append(index),
    )
    monkeypatch.delitem(process_group._state, "cuda_device_set", raising=False)
    process_group.chosen = chosen
    yield process_group
    process_group._state.pop("cuda_device_set", None)


def test_local_rank_picks_the_device(process_group, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    process_group.use_local_cuda_device(rank=5)
    process_group.use_local_cuda_device(rank=5)  # Once only.
    assert process_group.chosen == [3]


def test_without_local_rank_the_rank_modulo_the_gpus(
    process_group, monkeypatch
):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    process_group.use_local_cuda_device(rank=6)
    assert process_group.chosen == [2]
