"""Mesh and layout conversion, the configuration-keyed mesh cache, errors."""

import pytest

from integration_tests.torch_distributed import launcher


@pytest.mark.parametrize("nproc,mesh", [(2, "1,2"), (2, "2,1"), (4, "2,2")])
def test_meshes_layouts_and_cache(tmp_path, nproc, mesh):
    # The worker asserts the torch mesh shape, names, cache identity, a
    # collective over the model axis and the placements; here the errors.
    _, _, results = launcher.run_workers(
        "mesh_layout.py", nproc, tmp_path, args=["--mesh", mesh]
    )
    for result in results:
        unknown = str(result["unknown_axis"])
        assert "'nope'" in unknown and "['batch', 'model']" in unknown
        mismatch = str(result["size_mismatch"])
        assert f"{2 * nproc} devices" in mismatch
        assert f"world has {nproc} process" in mismatch
        assert "more than one tensor dimension" in str(result["axis_twice"])
