"""ModelCheckpoint and CSVLogger write once, from rank 0, all ranks in step."""

import h5py
import numpy as np

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity


def _h5_arrays(path):
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.append((name, item[()]))
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return dict(arrays)


def test_file_callbacks_write_once(tmp_path):
    args = ["--init", str(tmp_path / "init.npz")]
    reference = launcher.run_reference("callbacks.py", tmp_path, args)
    _, _, results = launcher.run_workers("callbacks.py", 2, tmp_path, args=args)
    parity.assert_results_match(results, reference, ["weight:"])
    reference_dir = tmp_path / "callbacks-reference"
    distributed_dir = tmp_path / "callbacks-2"
    # One header and one line per epoch: rank 1 did not write here too.
    csv = (distributed_dir / "distributed.csv").read_text().splitlines()
    assert len(csv) == 4, csv
    expected = (reference_dir / "reference.csv").read_text().splitlines()
    assert csv[0] == expected[0]
    for ours, theirs in zip(csv[1:], expected[1:]):
        # "NA" (no validation data) must match as text, numbers closely.
        ours, theirs = ours.split(","), theirs.split(",")
        assert [v == "NA" for v in ours] == [v == "NA" for v in theirs]
        np.testing.assert_allclose(
            [float(v) for v in ours if v != "NA"],
            [float(v) for v in theirs if v != "NA"],
            rtol=parity.RTOL,
        )
    ours = _h5_arrays(distributed_dir / "distributed.weights.h5")
    theirs = _h5_arrays(reference_dir / "reference.weights.h5")
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        parity.assert_close(ours[name], theirs[name], name)
    leftovers = {p.name for p in distributed_dir.iterdir()}
    assert leftovers == {
        "distributed.csv",
        "distributed.weights.h5",
        "rank0.npz",
        "rank1.npz",
    }, leftovers
