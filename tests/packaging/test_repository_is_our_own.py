"""The repository never contains an upstream Keras file.

The pristine upstream hashes come from the manifest the build wrote into the
installed fork (`keras/_fork_manifest.json`), or, where pristine upstream
keras is installed instead, from its wheel's RECORD. Nothing is imported
from keras and nothing is downloaded.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from build_tools import assemble
from build_tools import upstream

REPO = Path(__file__).resolve().parents[2]
_NOT_OURS = {".git", "build", "dist", "__pycache__", ".pytest_cache"}


def installed_manifest():
    """The installed fork's manifest, or None where keras is not the fork."""
    try:
        spec = importlib.util.find_spec("keras")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    manifest = Path(spec.origin).parent / "_fork_manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def pristine_upstream_hashes():
    """Relative path (`keras/...`) -> sha256 of every pristine upstream file."""
    manifest = installed_manifest()
    if manifest is not None:
        return manifest["upstream_sha256"]
    try:
        distribution = importlib.metadata.distribution("keras")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("keras is not installed: no upstream hashes to compare.")
    if "+" in distribution.version:
        pytest.fail(
            f"keras {distribution.version} (a fork) is installed without "
            "keras/_fork_manifest.json; reinstall it from this repository."
        )
    return upstream.record_hashes(distribution)


def _is_not_ours(name):
    return name in _NOT_OURS or name.startswith((".venv", "venv", ".ruff"))


def repository_files():
    """Tracked and untracked, not ignored, files; os.walk without git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others"]
            + ["--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [REPO / name for name in listed.split("\0") if name]
        return [path for path in paths if path.is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for directory, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [
            d
            for d in dirnames
            if not _is_not_ours(d) and not d.endswith(".egg-info")
        ]
        found.extend(Path(directory) / name for name in filenames)
    return [path for path in found if not path.name.endswith(".pyc")]


def test_repo_has_no_upstream_copy():
    hashes = pristine_upstream_hashes()
    by_hash = {digest: path for path, digest in hashes.items()}
    copies = []
    for path in repository_files():
        data = path.read_bytes()
        # Empty files (e.g. __init__.py) carry no content to copy.
        digest = hashlib.sha256(data).hexdigest()
        if data and digest in by_hash:
            copies.append((path.relative_to(REPO).as_posix(), by_hash[digest]))
    assert not copies, (
        f"Repository files byte-identical to upstream keras files: {copies}. "
        "Upstream code is fetched at build time and never committed."
    )


def test_no_repository_file_stands_at_an_upstream_path():
    upstream_paths = set(pristine_upstream_hashes())
    ours = {p.relative_to(REPO).as_posix() for p in repository_files()}
    clashes = sorted(ours & upstream_paths)
    assert not clashes, (
        f"Repository files at upstream paths: {clashes}. Change upstream "
        "files through patches/ (build_tools/patch_workspace.py)."
    )


def test_installed_fork_was_built_from_this_checkout():
    manifest = installed_manifest()
    if manifest is None:
        pytest.skip("The installed keras is not this fork (no manifest).")
    assert manifest["fork_version"] == upstream.FORK_VERSION
    assert manifest["upstream"] == f"keras=={upstream.UPSTREAM_VERSION}"
    assert importlib.metadata.version("keras") == upstream.FORK_VERSION
    # Reinstall (scripts/setup_venv.sh, or `pip install -e .`) after adding,
    # removing or renaming a file under keras/ or patches/.
    assert manifest["overlay"] == assemble.overlay_files(REPO)
    assert manifest["patches"] == [p.name for p in assemble.read_series(REPO)]
