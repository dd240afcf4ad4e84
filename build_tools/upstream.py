"""Locate the pinned upstream Keras in the build environment and read it.

Upstream is found through `importlib.metadata`, never imported, and every
file read is checked against the sha256 its wheel's RECORD lists.
"""

import base64
import csv
import hashlib
import importlib.metadata
from pathlib import Path

UPSTREAM_NAME = "keras"
UPSTREAM_VERSION = "3.15.1"
FORK_LOCAL_TAG = "torchdist"
FORK_VERSION = f"{UPSTREAM_VERSION}+{FORK_LOCAL_TAG}"


class UpstreamError(RuntimeError):
    """Upstream Keras is missing, of the wrong version, or altered."""


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def _record_hash_to_hex(value):
    algorithm, _, digest = value.partition("=")
    if algorithm != "sha256":
        raise UpstreamError(f"Unsupported RECORD hash algorithm: {value!r}")
    padded = digest + "=" * (-len(digest) % 4)
    return base64.urlsafe_b64decode(padded).hex()


def record_hashes(distribution):
    """Map `keras/...` paths of a distribution's RECORD to hex sha256.

    Skips `__pycache__`, `.pyc` files and the `.dist-info` folder.

    Args:
        distribution: An `importlib.metadata.Distribution` (or anything with
            its `read_text`).

    Returns:
        A dict of relative path to hex sha256.
    """
    text = distribution.read_text("RECORD")
    if text is None:
        raise UpstreamError("The upstream keras install has no RECORD.")
    hashes = {}
    for row in csv.reader(text.splitlines()):
        if len(row) < 2 or not row[1]:
            continue
        path = row[0]
        if not path.startswith(f"{UPSTREAM_NAME}/"):
            continue
        if "__pycache__" in path or path.endswith((".pyc", ".pyo")):
            continue
        hashes[path] = _record_hash_to_hex(row[1])
    if not hashes:
        raise UpstreamError("The upstream RECORD lists no keras files.")
    return hashes


class Upstream:
    """The files of an installed upstream Keras distribution.

    Args:
        distribution: An `importlib.metadata.Distribution`; defaults to the
            installed `keras`, which must be the pinned upstream release.
    """

    def __init__(self, distribution=None):
        if distribution is None:
            try:
                distribution = importlib.metadata.distribution(UPSTREAM_NAME)
            except importlib.metadata.PackageNotFoundError:
                raise UpstreamError(
                    f"{UPSTREAM_NAME}=={UPSTREAM_VERSION} is not installed in "
                    "the build environment. It is a build requirement "
                    "(pyproject.toml); build with pip, or install it first."
                ) from None
        version = distribution.version
        if "+" in version:
            raise UpstreamError(
                f"Found keras {version}, a fork, where pristine upstream "
                f"keras=={UPSTREAM_VERSION} was expected. Build in an "
                "isolated environment (the default for `pip install`)."
            )
        if version != UPSTREAM_VERSION:
            raise UpstreamError(
                f"Found keras {version} but this fork is built on keras=="
                f"{UPSTREAM_VERSION}. Install that version in the build "
                "environment, or move the pin (see CONTRIBUTING.md)."
            )
        self.version = version
        self._distribution = distribution
        self.hashes = record_hashes(distribution)

    def paths(self):
        """Relative paths (`keras/...`) of every upstream file, sorted."""
        return sorted(self.hashes)

    def read(self, path):
        """Return a file's bytes after checking them against RECORD."""
        expected = self.hashes.get(path)
        if expected is None:
            raise UpstreamError(f"{path} is not a file of upstream keras.")
        try:
            data = Path(self._distribution.locate_file(path)).read_bytes()
        except OSError as error:
            raise UpstreamError(
                f"{path}, listed in upstream keras {self.version}'s RECORD, "
                f"cannot be read ({error}). Reinstall keras=="
                f"{UPSTREAM_VERSION}."
            ) from None
        actual = sha256_hex(data)
        if actual != expected:
            raise UpstreamError(
                f"{path} in the build environment does not match upstream "
                f"keras {self.version}'s RECORD (sha256 {actual}, expected "
                f"{expected}). Reinstall keras=={UPSTREAM_VERSION}."
            )
        return data
