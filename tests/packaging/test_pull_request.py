"""The fork exported as one diff reproduces the assembled fork.

One test runs on a small fake upstream (edge cases: a file without a final
newline, an empty new file, two patches changing one file); one exports
this repository against the real pinned upstream (installed, or downloaded
as the build does) and applies it with the build's applier and, where git
is installed, with `git apply`.
"""

import shutil
import subprocess

import pytest

from build_tools import assemble
from build_tools import pull_request
from tests.packaging.fake_upstream import make_upstream

UPSTREAM_FILES = {
    "keras/__init__.py": "from keras.src import x\n",
    "keras/src/x.py": "".join(f"line {i}\n" for i in range(1, 30)),
    "keras/src/y.py": "no final newline",
}


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "patches").mkdir(parents=True)
    (repo / "patches/0001-a.patch").write_text(
        "--- a/keras/src/x.py\n+++ b/keras/src/x.py\n"
        "@@ -2,3 +2,3 @@\n line 2\n-line 3\n+line three\n line 4\n"
    )
    (repo / "patches/0002-b.patch").write_text(
        "--- a/keras/src/x.py\n+++ b/keras/src/x.py\n"
        "@@ -2,3 +2,4 @@\n line 2\n line three\n+added\n line 4\n"
        "--- a/keras/src/y.py\n+++ b/keras/src/y.py\n"
        "@@ -1 +1 @@\n-no final newline\n\\ No newline at end of file\n"
        "+still no final newline\n\\ No newline at end of file\n"
    )
    (repo / "patches/series").write_text("0001-a.patch\n0002-b.patch\n")
    (repo / "keras/src/backend").mkdir(parents=True)
    (repo / "keras/src/backend/ours.py").write_text("ours\n")
    (repo / "keras/src/backend/empty.py").write_text("")
    (repo / "keras/src/backend/open.py").write_text("x = 1\ny = 2")
    return repo


def test_export_round_trips_on_a_fake_upstream(tmp_path):
    repo = _repo(tmp_path)
    upstream = make_upstream(tmp_path, UPSTREAM_FILES)
    diff = pull_request.render(repo, upstream)
    # One section per changed upstream file, both patches folded into one.
    assert diff.count("--- a/keras/src/x.py\n") == 1
    assert "+line three\n+added\n" in diff
    assert "+++ b/keras/src/backend/ours.py\n" in diff
    assert pull_request.check(diff, repo, upstream) == 6
    # A diff that misses a change does not pass.
    broken = diff.replace("+added\n", "+adder\n")
    with pytest.raises(pull_request.PullRequestError, match="x.py"):
        pull_request.check(broken, repo, upstream)


def test_this_fork_exports_as_one_diff_that_reproduces_it(tmp_path):
    try:
        diff = pull_request.render()
    except Exception as error:  # pragma: no cover - offline machines
        pytest.skip(f"The pinned upstream is not available: {error}")
    count = pull_request.check(diff)
    overlay = assemble.overlay_files(pull_request.REPO)
    assert count > len(overlay) > 0
    for path in overlay:
        assert f"+++ b/{path}\n" in diff, path
    patched = {
        file_patch.path
        for patch in assemble.read_series(pull_request.REPO)
        for file_patch in pull_request.patch_apply.parse(patch.read_text())
    }
    for path in patched:
        assert diff.count(f"--- a/{path}\n") == 1, path
    if shutil.which("git") is None:
        return
    # `git apply` accepts it on a pristine tree.
    tree = tmp_path / "pristine"
    pull_request.patch_workspace._write_upstream(tree)
    (tmp_path / "fork.diff").write_text(diff)
    subprocess.run(
        ["git", "apply", "--check", str(tmp_path / "fork.diff")],
        cwd=tree,
        check=True,
        capture_output=True,
    )
