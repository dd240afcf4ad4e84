"""Device detection in one process and under torchrun."""

import numpy as np

from integration_tests.torch_distributed import launcher


def test_single_process_lists_local_cpu(tmp_path):
    reference = launcher.run_reference("devices.py", tmp_path)
    assert reference["devices"].tolist() == ["cpu:0"]
    assert int(reference["count"]) == 1
    assert int(reference["num_processes"]) == 1
    assert int(reference["process_id"]) == 0


def test_two_ranks_list_one_global_device_per_rank(tmp_path):
    _, _, results = launcher.run_workers("devices.py", 2, tmp_path)
    for rank, result in enumerate(results):
        assert result["devices"].tolist() == ["cpu:0", "cpu:1"]
        assert result["cpu_devices"].tolist() == ["cpu:0", "cpu:1"]
        assert int(result["count"]) == 2
        assert int(result["num_processes"]) == 2
        assert int(result["process_id"]) == rank
        # A batch of 7 rows: 4 and 3 moved to each rank's device.
        assert result["converted_rows"].tolist() == [[4], [3]][rank]
        assert int(result["local_rows"]) == [4, 3][rank]
        np.testing.assert_array_equal(result["global_batch"], result["batch"])
