"""The repository never contains an upstream Keras file.

The pristine upstream hashes come from the manifest the build wrote into the
installed fork (`keras/_fork_manifest.json`).
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
from pathlib import Path

from build_tools import assemble
from build_tools import upstream

REPO = Path(__file__).resolve().parents[2]


def installed_manifest():
    spec = importlib.util.find_spec("keras")
    package = Path(spec.origin).parent
    return json.loads((package / "_fork_manifest.json").read_text())


def repository_files():
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name]


def test_installed_keras_is_this_fork():
    assert importlib.metadata.version("keras") == upstream.FORK_VERSION
    manifest = installed_manifest()
    assert manifest["upstream"] == "keras==3.15.1"
    # The installed fork was built from this checkout's files.
    assert manifest["overlay"] == assemble.overlay_files(REPO)
    assert manifest["patches"] == [p.name for p in assemble.read_series(REPO)]


def test_no_file_is_a_copy_of_an_upstream_file():
    upstream_hashes = installed_manifest()["upstream_sha256"]
    by_hash = {digest: path for path, digest in upstream_hashes.items()}
    copies = []
    for path in repository_files():
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        # Empty files (e.g. __init__.py) carry no content to copy.
        if path.stat().st_size and digest in by_hash:
            copies.append((path.relative_to(REPO).as_posix(), by_hash[digest]))
    assert not copies, f"repository files identical to upstream: {copies}"


def test_no_repository_file_stands_at_an_upstream_path():
    upstream_paths = set(installed_manifest()["upstream_sha256"])
    ours = {p.relative_to(REPO).as_posix() for p in repository_files()}
    assert not ours & upstream_paths
