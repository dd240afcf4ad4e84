"""Assemble the fork: upstream Keras, the patch series, then our overlay.

    python -m build_tools.assemble --out DIR [--mode wheel|editable]

writes `DIR/keras/`: every upstream file (checked against RECORD), the
patches of `patches/series` applied in order, and every file of the
repository's `keras/` tree added. An overlay file may never stand where an
upstream file does: upstream files change only through patches. In editable
mode overlay files are symbolic links to the repository, so edits are live.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from build_tools import patch_apply
from build_tools import upstream as upstream_lib

MANIFEST = "keras/_fork_manifest.json"
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


class AssemblyError(RuntimeError):
    """The fork cannot be assembled as asked."""


def read_series(repo_root):
    """Patch file paths listed in `patches/series`, in order."""
    series = Path(repo_root) / "patches" / "series"
    if not series.exists():
        return []
    names = []
    for line in series.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(Path(repo_root) / "patches" / line)
    for path in names:
        if not path.exists():
            raise AssemblyError(f"patches/series lists missing {path.name}.")
    return names


def overlay_files(repo_root):
    """Relative paths (`keras/...`) of the repository's own keras files."""
    root = Path(repo_root)
    found = []
    for directory, dirnames, filenames in os.walk(root / "keras"):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(_SKIP_SUFFIXES):
                continue
            found.append((Path(directory) / name).relative_to(root).as_posix())
    return found


def _check_overlay(paths, upstream_paths):
    if "keras/__init__.py" in paths:
        raise AssemblyError(
            "The repository has keras/__init__.py. It must not: the repo's "
            "keras/ folder would shadow the installed package."
        )
    clashes = sorted(set(paths) & set(upstream_paths))
    if clashes:
        raise AssemblyError(
            f"Overlay files would replace upstream files: {clashes}. Change "
            "upstream files through a patch in patches/ instead."
        )


def assemble(out_dir, repo_root, mode="wheel", upstream=None):
    """Write the assembled `keras/` package under `out_dir`.

    Args:
        out_dir: Folder to write into; its `keras/` is replaced.
        repo_root: The repository root (has `keras/` and `patches/`).
        mode: `"wheel"` copies overlay files, `"editable"` links them.
        upstream: An `upstream.Upstream`; defaults to the installed one.

    Returns:
        The manifest dict also written to `keras/_fork_manifest.json`.
    """
    if mode not in ("wheel", "editable"):
        raise AssemblyError(f"Unknown mode {mode!r}: use wheel or editable.")
    started = time.perf_counter()
    repo_root, out_dir = Path(repo_root).resolve(), Path(out_dir)
    upstream = upstream or upstream_lib.Upstream()
    overlay = overlay_files(repo_root)
    _check_overlay(overlay, upstream.paths())

    target = out_dir / "keras"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    files = {path: upstream.read(path) for path in upstream.paths()}

    patches = read_series(repo_root)
    for patch_path in patches:
        patch_text = patch_path.read_bytes().decode("utf-8")
        for file_patch in patch_apply.parse(patch_text, patch_path.name):
            if file_patch.path not in files:
                raise AssemblyError(
                    f"{patch_path.name} changes {file_patch.path}, which is "
                    "not an upstream file."
                )
            text = files[file_patch.path].decode("utf-8")
            files[file_patch.path] = patch_apply.apply_to_text(
                text, file_patch, patch_path.name
            ).encode("utf-8")

    for path, data in files.items():
        destination = out_dir / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(data)
    for path in overlay:
        source, destination = repo_root / path, out_dir / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        if mode == "editable":
            destination.symlink_to(source)
        else:
            shutil.copyfile(source, destination)

    manifest = {
        "fork_version": upstream_lib.FORK_VERSION,
        "upstream": f"{upstream_lib.UPSTREAM_NAME}=={upstream.version}",
        "upstream_name": upstream_lib.UPSTREAM_NAME,
        "upstream_version": upstream.version,
        "upstream_sha256": upstream.hashes,
        "patches": [p.name for p in patches],
        "overlay": overlay,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="wheel")
    parser.add_argument(
        "--repo", default=str(Path(__file__).resolve().parent.parent)
    )
    args = parser.parse_args(argv)
    manifest = assemble(args.out, args.repo, args.mode)
    print(
        f"Assembled {manifest['upstream']} + {len(manifest['patches'])} "
        f"patches + {len(manifest['overlay'])} files into "
        f"{args.out}/keras in {manifest['seconds']}s"
    )


if __name__ == "__main__":
    main()
