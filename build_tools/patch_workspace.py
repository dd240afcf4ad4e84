"""A git workspace for editing the patch series (a maintainer tool).

    python -m build_tools.patch_workspace prepare DIR
    python -m build_tools.patch_workspace export DIR

`prepare` downloads the pinned upstream wheel (`pip download`), checks it
against its RECORD, writes its `keras/` tree into DIR as a git repository
with one commit for pristine upstream and then one commit per patch of
`patches/series` (the commit subject is the patch's file name). Edit, amend
or add commits there (a new patch: a commit whose subject is its file name,
e.g. `0007-torch-something.patch`). `export` writes each commit after the
pristine one back to `patches/<subject>` and rewrites `patches/series` in
commit order. The build itself never uses git; this tool does.
"""

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from build_tools import assemble
from build_tools import patch_apply
from build_tools import upstream as upstream_lib

REPO = Path(__file__).resolve().parent.parent
PRISTINE = f"upstream keras {upstream_lib.UPSTREAM_VERSION}"


def _git(directory, *args):
    return subprocess.run(
        ["git", "-C", str(directory), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _download_upstream(folder):
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--dest", str(folder),
            f"{upstream_lib.UPSTREAM_NAME}=={upstream_lib.UPSTREAM_VERSION}",
        ],
        check=True,
    )  # fmt: skip
    (wheel,) = Path(folder).glob("keras-*.whl")
    site = Path(folder) / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (dist_info,) = site.glob("keras-*.dist-info")
    return upstream_lib.Upstream(importlib.metadata.PathDistribution(dist_info))


def prepare(directory):
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"{directory} exists and is not empty.")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        upstream = _download_upstream(download)
        for path in upstream.paths():
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            (directory / path).write_bytes(upstream.read(path))
    _git(directory, "init", "-q")
    _git(directory, "add", "-A")
    _git(directory, "commit", "-qm", PRISTINE)
    for patch_path in assemble.read_series(REPO):
        for file_patch in patch_apply.parse(
            patch_path.read_text(), patch_path.name
        ):
            target = directory / file_patch.path
            target.write_text(
                patch_apply.apply_to_text(
                    target.read_text(), file_patch, patch_path.name
                )
            )
        _git(directory, "commit", "-qam", patch_path.name)
    print(f"Prepared {directory}: pristine upstream + one commit per patch.")


def export(directory):
    commits = _git(directory, "log", "--reverse", "--format=%H %s").split("\n")
    commits = [line.split(" ", 1) for line in commits if line]
    if not commits or commits[0][1] != PRISTINE:
        raise SystemExit(f"{directory} was not made by `prepare`.")
    names = []
    for sha, subject in commits[1:]:
        if not subject.endswith(".patch") or "/" in subject:
            raise SystemExit(
                f"Commit {sha[:10]} has subject {subject!r}; each commit's "
                "subject must be its patch file name, e.g. 0007-name.patch."
            )
        diff = _git(
            directory, "diff", "--src-prefix=a/", "--dst-prefix=b/",
            f"{sha}^", sha,
        )  # fmt: skip
        lines = [
            line
            for line in diff.splitlines(keepends=True)
            if not line.startswith(("diff --git", "index "))
        ]
        (REPO / "patches" / subject).write_text("".join(lines))
        names.append(subject)
    for stale in (REPO / "patches").glob("*.patch"):
        if stale.name not in names:
            stale.unlink()
    (REPO / "patches" / "series").write_text("\n".join(names) + "\n")
    print(f"Exported {len(names)} patches to patches/.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "export"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    {"prepare": prepare, "export": export}[args.command](args.directory)


if __name__ == "__main__":
    main()
