"""Bad input and failed steps: a clear error on every rank, never a hang."""

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

# Each case of `workers/bad_inputs.py` and a part of the message every rank
# must print for it.
BAD_INPUTS = {
    "mesh_larger_than_world": "The DeviceMesh has 3 devices",
    "repeated_axis_names": "which repeats ['model']",
    "unknown_axis_in_layout": "Valid axis names: ['batch', 'model'], "
    "Got ['tp']",
    "layout_with_more_entries": "variable 'dense/kernel' has 3 entries, "
    "(None, 'model', None), but the variable has 2 dimension(s)",
    "batch_dim_name_not_in_mesh": "Received: batch_dim_name='data', while "
    "the mesh's axis_names are ['batch', 'model']",
    "malformed_device_name": "Received: device_name='cpu:one'",
    "unknown_device_type": "Received: device_name='tpu:0'",
    "device_named_twice": "must name every rank exactly once",
    "initialize_with_another_world_size": "already formed with 2 "
    "processes, but `initialize()` received num_processes=3",
    "initialize_with_another_rank": "`initialize()` received process_id=",
    "distribution_set_after_variables": "4 trainable variable(s) of model "
    "'sequential' were created before the distribution was set",
    "ranks_build_different_shapes": "shape (variable 'dense/kernel'): "
    "rank 0 has [4, 4], rank 1 has [4, 5]",
    "ranks_build_different_dtypes": "dtype (variable 'dense/kernel'): "
    "rank 0 has float32, rank 1 has float64",
    "ranks_use_different_layouts": "layout (variable 'dense/kernel'): "
    "rank 0 has ['S(1)'], rank 1 has ['R']",
    "ranks_build_different_models": "rank 1: variable "
    "'sequential/dense_2/kernel'",
    "ranks_run_layers_in_different_orders": "gradients (by position in "
    "the model's trainable variables): rank 0 has [2, 3, 0, 1], rank 1 "
    "has [0, 1, 2, 3]",
    "ranks_read_different_batch_sizes": "the same number of batches per "
    "epoch, but they differ: rank 0 has 2, rank 1 has 4",
    "ranks_read_different_numbers_of_batches": "the same number of "
    "batches per epoch, but they differ: rank 0 has 2, rank 1 has 3",
}
# Messages that name the rank they are raised on.
_PER_RANK = {"initialize_with_another_rank"}


def test_bad_input_fails_alike_on_every_rank(tmp_path):
    """Every case raises on every rank, with the same message, and leaves
    the ranks in step: the next case runs, and a last DataParallel fit
    matches one process."""
    _, output, results = launcher.run_workers(
        "bad_inputs.py", 2, tmp_path, timeout=240
    )
    assert not launcher.leftover_processes(tmp_path / "bad_inputs-2")
    reference = launcher.run_reference("bad_inputs.py", tmp_path)
    for case, expected in BAD_INPUTS.items():
        messages = [str(r[f"message:{case}"]) for r in results]
        for rank, message in enumerate(messages):
            assert expected in message, (case, rank, message)
            assert f"{rank}]:case {case}: ValueError: " in output, case
        if case not in _PER_RANK:
            assert messages[0] == messages[1], (case, messages)
    assert not [
        k
        for k in results[0]
        if k.startswith("message:") and k[len("message:") :] not in BAD_INPUTS
    ]
    for rank_results in results:
        for key, value in reference.items():
            parity.assert_close(rank_results[key], value, key)


def test_sampler_for_another_world_fails_on_every_rank(tmp_path):
    returncode, output, _ = launcher.run_workers(
        "bad_sampler.py", 2, tmp_path, expect_success=False, timeout=120
    )
    assert returncode != 0
    launcher.assert_every_rank_printed(
        output, "DistributedSampler splits the data 3 ways"
    )


def test_layout_map_key_matching_nothing_warns_once_on_rank_0(tmp_path):
    _, output, results = launcher.run_workers(
        "layout_keys.py", 2, tmp_path, timeout=120
    )
    # fit, evaluate and predict each check; the key is reported once.
    assert int(results[0]["warnings"]) == 1, output
    assert int(results[1]["warnings"]) == 0, output
    warned = [line for line in output.splitlines() if "warned:" in line]
    # torchrun prefixes each line with its rank (`[default0]:`).
    assert len(warned) == 1 and "0]:warned:" in warned[0], output
    assert "'dense.*kernel'" in warned[0], output
    assert "'sequential/dense/kernel'" in warned[0], output
    assert "'.*dense.*kernel'" in warned[0], output
    assert "'.*dense.*bias'" not in warned[0], output
    # What the warning says: the kernels stayed whole, the biases sharded.
    for rank_results in results:
        assert tuple(rank_results["kernel_local"]) == (4, 8)
        assert tuple(rank_results["bias_local"]) == (4,)
    # The summary shows it too, the same on every rank, printed on rank 0.
    summary = str(results[0]["summary"])
    assert str(results[1]["summary"]) == summary
    lines = summary.splitlines()
    assert "ModelParallel over a mesh of shape (1, 2)" in lines[1], summary
    assert "  'dense.*kernel': matches no variable (nothing sharded)" in lines
    assert (
        "  '.*dense.*bias': 2 variable(s): sequential/dense/bias, "
        "sequential/dense_1/bias" in lines
    ), summary
    rows = {line.split()[0]: line.split()[1:] for line in lines if "/" in line}
    kernel = ["(4,", "8)", "replicated", "(4,", "8)", "128", "B"]
    assert rows["sequential/dense/kernel"] == kernel, rows
    bias = ["(8,)", "(model)", "(4,)", "16", "B"]
    assert rows["sequential/dense/bias"] == bias, rows
    # Kernels whole (48 floats), biases halved (5 of 10 floats).
    assert "Parameters: 212 B per process (91% of the 232 B" in summary
    for rank in range(2):
        for title in ("Sharding of model", 'Model: "sequential"'):
            printed = [
                line
                for line in output.splitlines()
                if line.startswith(f"[default{rank}]:{title}")
            ]
            assert len(printed) == (1 if rank == 0 else 0), (title, output)
        formatted = str(results[rank]["formatted_warning"])
        assert formatted.startswith(f"[process {rank}] f.py:1: "), formatted


def test_step_retried_after_a_failed_backward_matches_one_process(tmp_path):
    """A backward that raises on every rank (caught, then the step retried
    with half the batch) leaves nothing behind that joins the retry."""
    args = ["--init", str(tmp_path / "init.npz")]
    env = {"KERAS_TORCH_GRADIENT_BUCKET_MB": "0.001"}
    reference = launcher.run_reference("failed_backward.py", tmp_path, args)
    _, output, results = launcher.run_workers(
        "failed_backward.py", 2, tmp_path, args, env=env, timeout=180
    )
    assert not launcher.leftover_processes(tmp_path / "failed_backward-2")
    for rank in range(2):
        assert f"[default{rank}]:caught: out of memory" in output, output
    for rank_results in results:
        # The failure left buckets filling or reducing: the case arises.
        filling, in_flight, _ = rank_results["left_by_failure"]
        assert filling + in_flight > 0, rank_results["left_by_failure"]
        # The retry dropped them, and every buffer is free again.
        assert list(rank_results["after_retry"]) == [0, 0, 0]
        # 4 Dense layers: 8 gradients in the first step and in the retry.
        assert list(rank_results["reduced"]) == [8, 8]
        for key, value in reference.items():
            if key.startswith("weight:") or key == "losses":
                parity.assert_close(rank_results[key], value, key)
