"""Mesh and layout conversion, the configuration-keyed mesh cache, errors."""

from pathlib import Path

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
    # NOTE [gloo at exit]: once Keras's teardown has run, no gloo thread is
    # left for the interpreter's finalization (the meshes, cached, still
    # exist then).
    results_dir = Path(tmp_path) / f"mesh_layout-{nproc}"
    for rank in range(nproc):
        names = (results_dir / f"rank{rank}.threads").read_text().split()
        assert "python" in names, names
        assert not [n for n in names if "gloo" in n], (rank, names)
