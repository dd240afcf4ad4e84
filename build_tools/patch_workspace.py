"""A git workspace for editing the patch series (a maintainer tool).

    python -m build_tools.patch_workspace prepare DIR
    python -m build_tools.patch_workspace export DIR

`prepare` writes the pinned upstream `keras/` tree into DIR (from the
installed upstream when it is the pinned release, else from
`pip download`; either way checked against its RECORD) as a git repository
with one commit for pristine upstream and then one commit per entry of
`patches/series`, whose subject is the patch's file name.

Edit upstream files there and fold each change into the commit of its patch
(`git commit --fixup` + `git rebase -i --autosquash`, or `git commit
--amend` on the last one). A new patch is a new commit whose subject is its
file name, e.g. `0007-torch-something.patch`. Commit everything, then
`export` writes each commit after the pristine one to `patches/<subject>`
(`git diff` with `a/` and `b/` prefixes), rewrites `patches/series` in
commit order, deletes series entries that no longer have a commit, and
checks that the exported series re-applies with the build's own applier to
exactly the workspace's files. Patches only modify upstream files: new files
belong in the repository's `keras/` tree. The build itself never uses git;
this tool does.
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
_IDENTITY = (
    "-c", "user.name=patch_workspace",
    "-c", "user.email=patch_workspace@localhost",
    "-c", "commit.gpgsign=false",
)  # fmt: skip


class WorkspaceError(RuntimeError):
    """The workspace is not in a state this tool can use."""


def _git(directory, *args, binary=False):
    result = subprocess.run(
        ["git", "-C", str(directory), *args],
        capture_output=True,
        check=False,
    )
    if result.returncode:
        raise WorkspaceError(
            f"git {' '.join(args)} failed in {directory}:\n"
            + result.stderr.decode(errors="replace")
        )
    return result.stdout if binary else result.stdout.decode("utf-8")


def _downloaded_upstream(folder):
    pin = f"{upstream_lib.UPSTREAM_NAME}=={upstream_lib.UPSTREAM_VERSION}"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--dest", str(folder), pin,
        ],
        check=True,
    )  # fmt: skip
    (wheel,) = Path(folder).glob("keras-*.whl")
    site = Path(folder) / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (dist_info,) = site.glob("keras-*.dist-info")
    return upstream_lib.Upstream(importlib.metadata.PathDistribution(dist_info))


def _write_upstream(directory):
    try:
        upstream = upstream_lib.Upstream()
    except upstream_lib.UpstreamError as error:
        print(f"Installed keras not usable ({error}); downloading it.")
        upstream = None
    if upstream is not None:
        source = "the installed upstream keras"
        files = {path: upstream.read(path) for path in upstream.paths()}
    else:
        source = "a downloaded upstream wheel"
        with tempfile.TemporaryDirectory() as download:
            upstream = _downloaded_upstream(download)
            files = {path: upstream.read(path) for path in upstream.paths()}
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    return source


def prepare(directory, repo=REPO):
    """Create the workspace: pristine upstream, then one commit per patch."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise WorkspaceError(f"{directory} exists and is not empty.")
    directory.mkdir(parents=True, exist_ok=True)
    source = _write_upstream(directory)
    _git(directory, "init", "-q")
    exclude = directory / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text("__pycache__/\n*.pyc\n")
    _git(directory, "add", "-A")
    _git(directory, *_IDENTITY, "commit", "-qm", PRISTINE)
    patches = assemble.read_series(repo)
    for patch_path in patches:
        text = patch_path.read_bytes().decode("utf-8")
        for file_patch in patch_apply.parse(text, patch_path.name):
            target = directory / file_patch.path
            if not target.is_file():
                raise WorkspaceError(
                    f"{patch_path.name} changes {file_patch.path}, which is "
                    "not an upstream file."
                )
            new = patch_apply.apply_to_text(
                target.read_bytes().decode("utf-8"), file_patch, patch_path.name
            )
            target.write_bytes(new.encode("utf-8"))
        _git(directory, *_IDENTITY, "commit", "-qam", patch_path.name)
    print(
        f"Prepared {directory} from {source}: a pristine commit and "
        f"{len(patches)} patch commits."
    )


def _patch_commits(directory):
    log = _git(directory, "log", "--reverse", "--format=%H %P%x00%s")
    commits = []
    for line in filter(None, log.split("\n")):
        shas, subject = line.split("\0", 1)
        sha, *parents = shas.split()
        if len(parents) > 1:
            raise WorkspaceError(
                f"Commit {sha[:10]} is a merge; rebase to a linear history."
            )
        commits.append((sha, subject))
    if not commits or commits[0][1] != PRISTINE:
        raise WorkspaceError(
            f"{directory} was not made by `prepare` (its first commit must "
            f"be {PRISTINE!r})."
        )
    return commits


def _diff(directory, sha):
    status = _git(
        directory, "diff", "--no-renames", "--name-status", f"{sha}^", sha
    )
    for line in filter(None, status.split("\n")):
        kind, path = line.split("\t", 1)
        if kind != "M":
            raise WorkspaceError(
                f"Commit {sha[:10]} adds, deletes or retypes {path} "
                f"({kind}). Patches only modify upstream files; put new "
                "files in the repository's keras/ tree instead."
            )
    diff = _git(
        directory, "diff", "--no-color", "--no-ext-diff", "--no-renames",
        "--src-prefix=a/", "--dst-prefix=b/", f"{sha}^", sha,
        binary=True,
    ).decode("utf-8")  # fmt: skip
    if not diff:
        raise WorkspaceError(f"Commit {sha[:10]} changes nothing.")
    kept = [
        line
        for line in diff.split("\n")
        if not line.startswith(("diff --git ", "index "))
    ]
    return "\n".join(kept)


def _check_round_trip(directory, pristine_sha, exported):
    """The exported series, applied by the build's applier, gives HEAD."""
    files = {}
    for name, text in exported:
        for file_patch in patch_apply.parse(text, name):
            if file_patch.path not in files:
                files[file_patch.path] = _git(
                    directory, "show", f"{pristine_sha}:{file_patch.path}",
                    binary=True,
                ).decode("utf-8")  # fmt: skip
            files[file_patch.path] = patch_apply.apply_to_text(
                files[file_patch.path], file_patch, name
            )
    for path, text in files.items():
        head = _git(directory, "show", f"HEAD:{path}", binary=True)
        if text.encode("utf-8") != head:
            raise WorkspaceError(
                f"The exported patches do not reproduce {path}; nothing was "
                "written. Please report this as a bug in patch_workspace."
            )


def export(directory, repo=REPO):
    """Write one patch per commit after the pristine one; rewrite series."""
    directory, patches_dir = Path(directory), Path(repo) / "patches"
    if _git(directory, "status", "--porcelain"):
        raise WorkspaceError(
            f"{directory} has uncommitted changes; commit them into the "
            "patch they belong to first."
        )
    commits = _patch_commits(directory)
    exported = []
    for sha, subject in commits[1:]:
        if not subject.endswith(".patch") or "/" in subject:
            raise WorkspaceError(
                f"Commit {sha[:10]} has subject {subject!r}; each commit's "
                "subject must be its patch file name, e.g. 0007-name.patch."
            )
        exported.append((subject, _diff(directory, sha)))
    names = [name for name, _ in exported]
    if len(set(names)) != len(names):
        raise WorkspaceError(f"Two commits share a patch name: {names}.")
    _check_round_trip(directory, commits[0][0], exported)

    previous = [path.name for path in assemble.read_series(repo)]
    patches_dir.mkdir(exist_ok=True)
    for name, text in exported:
        (patches_dir / name).write_bytes(text.encode("utf-8"))
    for stale in set(previous) - set(names):
        (patches_dir / stale).unlink()
    (patches_dir / "series").write_text("".join(f"{name}\n" for name in names))
    print(f"Exported {len(names)} patches to {patches_dir}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "export"])
    parser.add_argument("directory")
    parser.add_argument("--repo", default=str(REPO))
    args = parser.parse_args(argv)
    command = {"prepare": prepare, "export": export}[args.command]
    try:
        command(args.directory, Path(args.repo))
    except (WorkspaceError, patch_apply.PatchError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
