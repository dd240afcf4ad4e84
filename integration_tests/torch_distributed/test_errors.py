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
