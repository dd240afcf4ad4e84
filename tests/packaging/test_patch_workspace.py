import shutil
import subprocess

import pytest

from build_tools import assemble
from build_tools import patch_workspace
from tests.packaging.fake_upstream import make_upstream

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None, reason="patch_workspace needs git"
)

UPSTREAM_FILES = {
    "keras/__init__.py": "from keras.src import x\n",
    "keras/src/x.py": "".join(f"line {i}\n" for i in range(1, 30)),
}


def git(directory, *args):
    subprocess.run(
        ["git", "-C", str(directory), *patch_workspace._IDENTITY, *args],
        check=True,
        capture_output=True,
    )


def make_workspace(tmp_path):
    workspace = tmp_path / "workspace"
    for path, text in UPSTREAM_FILES.items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_text(text)
    git(workspace, "init", "-q")
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", patch_workspace.PRISTINE)
    return workspace


def edit(workspace, old, new, subject):
    target = workspace / "keras/src/x.py"
    target.write_text(target.read_text().replace(old, new))
    git(workspace, "commit", "-qam", subject)


def test_export_writes_one_patch_per_commit_that_assembles(tmp_path):
    workspace = make_workspace(tmp_path)
    edit(workspace, "line 3\n", "line three\n", "0001-first.patch")
    edit(workspace, "line 20\n", "line 20\nadded\n", "0002-second.patch")
    repo = tmp_path / "repo"
    (repo / "keras/src").mkdir(parents=True)
    (repo / "keras/src/ours.py").write_text("ours\n")
    patch_workspace.export(workspace, repo)

    series = (repo / "patches/series").read_text().split()
    assert series == ["0001-first.patch", "0002-second.patch"]
    first = (repo / "patches/0001-first.patch").read_text()
    assert first.startswith("--- a/keras/src/x.py\n+++ b/keras/src/x.py\n")
    assert "+line 20" not in first
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    assemble.assemble(tmp_path / "out", repo, upstream=fake)
    assembled = (tmp_path / "out/keras/src/x.py").read_text()
    assert assembled == (workspace / "keras/src/x.py").read_text()


def test_export_refuses_new_files_and_dirty_workspaces(tmp_path):
    workspace = make_workspace(tmp_path)
    (workspace / "keras/src/new.py").write_text("new\n")
    with pytest.raises(patch_workspace.WorkspaceError, match="uncommitted"):
        patch_workspace.export(workspace, tmp_path / "repo")
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "0001-new-file.patch")
    with pytest.raises(patch_workspace.WorkspaceError, match="keras/ tree"):
        patch_workspace.export(workspace, tmp_path / "repo")


def test_export_needs_patch_names_as_subjects(tmp_path):
    workspace = make_workspace(tmp_path)
    edit(workspace, "line 3\n", "line three\n", "fix things")
    with pytest.raises(patch_workspace.WorkspaceError, match="subject"):
        patch_workspace.export(workspace, tmp_path / "repo")
