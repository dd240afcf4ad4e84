"""Bad input: a clear error on every rank, never a hang."""

from integration_tests.torch_distributed import launcher


def test_mesh_larger_than_world_fails_on_every_rank(tmp_path):
    returncode, output, _ = launcher.run_workers(
        "bad_mesh.py", 2, tmp_path, expect_success=False, timeout=120
    )
    assert returncode != 0
    for rank in range(2):
        assert f"[rank{rank}]" in output and "ValueError" in output, output
    assert output.count("The DeviceMesh has 3 devices") >= 2, output


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
    assert "'.*dense.*bias'" not in output, output
    # What the warning says: the kernels stayed whole, the biases sharded.
    for rank_results in results:
        assert tuple(rank_results["kernel_local"]) == (4, 8)
        assert tuple(rank_results["bias_local"]) == (4,)
