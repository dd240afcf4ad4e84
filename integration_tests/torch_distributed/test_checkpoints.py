"""Saving, loading, sharded checkpoints and resume, against one process.

Every launch of a test shares one folder of files (`shared`): the
reference's files are loaded by the distributed run, the distributed
run's files by one process and by runs on other meshes.
"""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

SCRIPT = "checkpoints.py"
WORKER = str(launcher.WORKERS / SCRIPT)


def _args(shared, scenario, *extra):
    return [
        "--scenario",
        scenario,
        "--shared",
        str(shared),
        "--init",
        str(shared / "init.npz"),
        *extra,
    ]


def _matching(results, reference, tag):
    """`results` keyed like the reference's (`:one` -> `:tag`)."""
    return {
        key.replace(":one", f":{tag}"): value
        for key, value in reference.items()
    }


def _h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()])
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return arrays


def _one_process(code, cwd):
    """Run `code` in a fresh single process, with no distribution."""
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The reference's and the 2-rank run's `save` scenario."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    shared = tmp / "shared"
    shared.mkdir()
    reference = launcher.run_reference(
        SCRIPT, tmp / "reference", _args(shared, "save")
    )
    _, _, results = launcher.run_workers(
        SCRIPT,
        2,
        tmp / "save",
        _args(shared, "save"),
        # The DDP habit's wait: its default is 30 s.
        env={"KERAS_TORCH_SAVE_ARRIVAL_TIMEOUT": "5"},
    )
    return shared, reference, results


@pytest.mark.parametrize("tag", ["dp", "mp12"])
def test_training_then_saving_matches_one_process(saved, tag):
    shared, reference, results = saved
    expected = _matching(results, reference, tag)
    parity.assert_results_match(
        results,
        {k: v for k, v in expected.items() if not k.startswith("loss:")},
        [f"weight:{tag}", f"opt:{tag}", f"pred:{tag}"],
    )
    for rank_results in results:
        parity.assert_close(
            rank_results[f"loss:{tag}"], expected[f"loss:{tag}"], "loss"
        )
    # ModelParallel holds half of the hidden kernel on each rank.
    local = tuple(results[0][f"local_shape:{tag}"])
    assert local == ((8, 8) if tag == "mp12" else (8, 16)), local


@pytest.mark.parametrize("tag", ["dp", "mp12"])
def test_full_files_hold_what_one_process_saves(saved, tag):
    shared, _, _ = saved
    names = {p.name for p in shared.iterdir()}
    # One complete file per save, and nothing else: no temporary files,
    # no copies of a non-chief rank.
    expected = {
        f"{tag}.weights.h5",
        f"{tag}.keras",
        f"{tag}.ckpt.weights.h5",
        f"{tag}.ckpt.keras",
        f"{tag}.sharded",
    }
    assert expected <= names, names
    assert not [n for n in names if n.startswith(".")], names
    for name in (f"{tag}.weights.h5", f"{tag}.ckpt.weights.h5"):
        ours = _h5_arrays(shared / name)
        theirs = _h5_arrays(shared / name.replace(tag, "one"))
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            parity.assert_close(ours[key], theirs[key], f"{name}:{key}")


def test_distributed_files_load_in_one_process(saved, tmp_path):
    shared, reference, _ = saved
    # Stock Keras in one process: load each file the 2-rank runs wrote and
    # compare its predictions with the reference's.
    code = f"""
import numpy as np, keras
x = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
expected = np.load({str(tmp_path / "expected.npy")!r})
for tag in ("dp", "mp12"):
    for name in (tag + ".keras", tag + ".ckpt.keras", tag + ".sharded"):
        model = keras.saving.load_model({str(shared)!r} + "/" + name)
        got = model.predict(x, verbose=0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
"""
    np.save(tmp_path / "expected.npy", reference["pred:one"])
    _one_process(code, tmp_path)


@pytest.mark.parametrize("tag", ["dp", "mp12"])
def test_one_process_files_load_into_shards(saved, tag):
    _, reference, results = saved
    for key in ("loaded_weights_pred", "loaded_model_pred"):
        for rank_results in results:
            parity.assert_close(
                rank_results[f"{key}:{tag}"], reference["pred:one"], key
            )
    # The loaded variables have this run's layout, not the file's.
    for key in ("loaded_local_shape", "loaded_model_local_shape"):
        local = tuple(results[0][f"{key}:{tag}"])
        assert local == ((8, 8) if tag == "mp12" else (8, 16)), (key, local)
    expected = {
        k.replace("opt:one", f"loaded_opt:{tag}"): v
        for k, v in reference.items()
        if k.startswith("opt:one")
    }
    parity.assert_results_match(results, expected, [f"loaded_opt:{tag}"])


@pytest.mark.parametrize("tag", ["dp", "mp12"])
def test_mismatched_files_raise_on_every_rank(saved, tag):
    _, _, results = saved
    for rank_results in results:
        message = str(rank_results[f"mismatch_h5:{tag}"])
        assert message.startswith("ValueError"), message
        assert "(8, 12)" in message and "[8, 16]" in message, message
        message = str(rank_results[f"mismatch_sharded:{tag}"])
        assert message.startswith("ValueError"), message
        assert "'hidden/kernel'" in message, message
        assert "(8, 16)" in message and "(8, 12)" in message, message
        # Keras's `safe_mode` holds on every rank: a file with Python code
        # loads only when the caller opts out.
        message = str(rank_results[f"unsafe:{tag}"])
        assert message.startswith("ValueError"), message
        assert "safe_mode" in message, message
        x = np.arange(16, dtype="float32").reshape(2, 8)
        np.testing.assert_array_equal(rank_results[f"unsafe_pred:{tag}"], x * 2)


def test_saving_on_process_0_alone(saved):
    shared, _, results = saved
    # DataParallel: nothing to gather, so process 0 writes alone at once.
    assert str(results[0]["solo:dp"]) == "no error"
    assert float(results[0]["solo_seconds:dp"]) < 5
    assert (shared / "dp.solo.weights.h5").exists()
    # ModelParallel: the gathers need every rank; process 0 says so
    # after the arrival timeout instead of hanging.
    message = str(results[0]["solo:mp12"])
    assert message.startswith("RuntimeError"), message
    assert "called on 1 of 2 processes" in message, message
    assert "on every process" in message, message
    assert 5 <= float(results[0]["solo_seconds:mp12"]) < 15
    assert not (shared / "mp12.solo.weights.h5").exists()


@pytest.mark.parametrize(
    "layout, nproc", [("mp21", 2), ("mp22", 4), ("one", 1)]
)
def test_sharded_checkpoint_loads_on_another_mesh(
    saved, tmp_path, layout, nproc
):
    shared, reference, _ = saved
    args = _args(shared, "load", "--layout", layout)
    if nproc == 1:
        results = [launcher.run_reference(SCRIPT, tmp_path, args)]
    else:
        _, _, results = launcher.run_workers(SCRIPT, nproc, tmp_path, args)
    # Saved by ModelParallel (1, 2) after the same training as the
    # reference: weights, Adam's moments and `iterations`, predictions.
    expected = {}
    for source in ("mp12.sharded", "mp12.keras", "load_weights"):
        for key, value in reference.items():
            for kind in ("weight", "opt"):
                if key.startswith(f"{kind}:one"):
                    expected[key.replace(":one", f":{source}")] = value
        if source != "load_weights":
            expected[f"pred:{source}"] = reference["pred:one"]
    parity.assert_results_match(results, expected, ["weight:", "opt:", "pred:"])
    local = tuple(results[0]["local_shape:mp12.sharded"])
    assert local == {"mp21": (8, 16), "mp22": (8, 8), "one": (8, 16)}[layout], (
        local
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`{kind: (initial weights file, results)}` of one process."""
    tmp = tmp_path_factory.mktemp("resume-reference")
    runs = {}
    for kind in ("backup", "sharded"):
        shared = tmp / kind / "shared"
        shared.mkdir(parents=True)
        results = launcher.run_reference(
            SCRIPT,
            tmp / kind,
            _args(shared, "resume", "--resume-with", kind),
        )
        runs[kind] = (shared / "init.npz", results)
    return runs


def _start_from(uninterrupted, kind, tmp_path):
    init, reference = uninterrupted[kind]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "init.npz").write_bytes(init.read_bytes())
    return shared, reference


def _assert_resumed(results, reference):
    parity.assert_results_match(
        results,
        {k: v for k, v in reference.items() if k not in ("epochs", "loss")},
        ["weight:", "opt:"],
    )
    for rank_results in results:
        # The restarted run starts after the last complete checkpoint: the
        # end of epoch 2, or of epoch 1 when the background save of epoch
        # 2 was still being written when rank 1 died in epoch 3.
        epochs = list(rank_results["epochs"])
        assert epochs in ([2, 3], [1, 2, 3]), epochs
        parity.assert_close(
            rank_results["loss"], reference["loss"][epochs[0] :], "loss"
        )


@pytest.mark.parametrize(
    "kind, layout", [("backup", "dp"), ("sharded", "mp12")]
)
def test_torchrun_restart_resumes_like_an_uninterrupted_run(
    uninterrupted, tmp_path, kind, layout
):
    shared, reference = _start_from(uninterrupted, kind, tmp_path)
    _, output, results = launcher.run_workers(
        SCRIPT,
        2,
        tmp_path / "run",
        _args(shared, "resume", "--resume-with", kind, "--layout", layout),
        torchrun_args=["--max-restarts=1"],
    )
    assert (shared / "killed").exists(), output
    _assert_resumed(results, reference)


def test_restart_by_hand_resumes_like_an_uninterrupted_run(
    uninterrupted, tmp_path
):
    shared, reference = _start_from(uninterrupted, "sharded", tmp_path)
    args = _args(shared, "resume", "--resume-with", "sharded")
    returncode, _, _ = launcher.run_workers(
        SCRIPT, 2, tmp_path / "killed", args, expect_success=False
    )
    assert returncode != 0 and (shared / "killed").exists()
    _, _, results = launcher.run_workers(SCRIPT, 2, tmp_path / "again", args)
    _assert_resumed(results, reference)


def test_killed_save_leaves_the_previous_file(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    returncode, output, results = launcher.run_workers(
        SCRIPT,
        2,
        tmp_path / "run",
        _args(shared, "interrupted"),
        expect_success=False,
    )
    assert returncode != 0, output
    assert "process 0 should have died" not in output, output
    # The target still holds the first save, complete; the second one's
    # temporary file is all that is left of it.
    saved = _h5_arrays(shared / "interrupted.weights.h5")
    # The layers' variables; the optimizer's (`iterations`, the learning
    # rate) are saved too.
    saved = {k: v for k, v in saved.items() if k.startswith("layers/")}
    expected = {k: v for k, v in results[0].items() if k.startswith("weight:")}
    assert len(saved) == len(expected) > 0, (saved.keys(), expected.keys())
    for array in saved.values():
        assert any(
            array.shape == value.shape and np.array_equal(array, value)
            for value in expected.values()
        )
    leftovers = [p.name for p in shared.iterdir() if p.name.startswith(".")]
    assert all(name.endswith(".tmp") for name in leftovers), leftovers


def test_full_files_stream_one_variable_at_a_time(tmp_path):
    """Saving and loading a 125 MB file never holds the model in full.

    Each rank's peak memory grows by at most one full variable (62.5 MB)
    plus the streaming buffer and h5py's working memory, not by the
    whole model's 125 MB.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    _, _, results = launcher.run_workers(
        SCRIPT, 2, tmp_path / "run", _args(shared, "streaming")
    )
    # h5py's and the allocator's working memory; gathering both kernels
    # would grow by 125 MB or more.
    slack_mb = 32
    for rank, result in enumerate(results):
        assert result["assigned"] and result["loaded"], rank
        assert result["read_in_full"], rank
        largest = float(result["largest_mb"])
        for key in ("save_growth_mb", "load_growth_mb"):
            assert float(result[key]) <= largest + slack_mb, (rank, key, result)
    assert results[0]["written"]
