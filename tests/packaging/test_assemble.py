import json
from pathlib import Path

import pytest

from build_tools import assemble
from build_tools import upstream
from tests.packaging.fake_upstream import FakeDistribution
from tests.packaging.fake_upstream import make_upstream

UPSTREAM_FILES = {
    "keras/__init__.py": "from keras.src import x\n",
    "keras/src/x.py": "value = 1\n",
}


def make_repo(tmp_path, overlay=None, patch=None):
    repo = tmp_path / "repo"
    for path, text in (overlay or {"keras/src/ours.py": "ours\n"}).items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    (repo / "patches").mkdir(parents=True, exist_ok=True)
    if patch:
        (repo / "patches" / "0001.patch").write_text(patch)
        (repo / "patches" / "series").write_text("# comment\n0001.patch\n")
    return repo


PATCH = """\
--- a/keras/src/x.py
+++ b/keras/src/x.py
@@ -1 +1 @@
-value = 1
+value = 2
"""


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_assembles_upstream_patches_and_overlay(tmp_path, mode):
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    repo = make_repo(tmp_path, patch=PATCH)
    out = tmp_path / "out"
    manifest = assemble.assemble(out, repo, mode=mode, upstream=fake)
    assert (out / "keras/src/x.py").read_text() == "value = 2\n"
    assert (out / "keras/__init__.py").read_text() == UPSTREAM_FILES[
        "keras/__init__.py"
    ]
    ours = out / "keras/src/ours.py"
    assert ours.read_text() == "ours\n"
    assert ours.is_symlink() == (mode == "editable")
    assert manifest["patches"] == ["0001.patch"]
    assert manifest["overlay"] == ["keras/src/ours.py"]
    written = json.loads((out / assemble.MANIFEST).read_text())
    assert set(written["upstream_sha256"]) == set(UPSTREAM_FILES)


def test_overlay_may_not_replace_an_upstream_file(tmp_path):
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    repo = make_repo(tmp_path, overlay={"keras/src/x.py": "mine\n"})
    with pytest.raises(assemble.AssemblyError, match="through a patch"):
        assemble.assemble(tmp_path / "out", repo, upstream=fake)


def test_repo_may_not_have_keras_init(tmp_path):
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    repo = make_repo(tmp_path, overlay={"keras/__init__.py": "x\n"})
    with pytest.raises(assemble.AssemblyError, match="shadow"):
        assemble.assemble(tmp_path / "out", repo, upstream=fake)


def test_patch_that_does_not_apply_fails_the_build(tmp_path):
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    repo = make_repo(tmp_path, patch=PATCH.replace("-value = 1", "-value = 7"))
    with pytest.raises(ValueError, match="does not apply"):
        assemble.assemble(tmp_path / "out", repo, upstream=fake)


def test_altered_upstream_file_fails_the_record_check(tmp_path):
    fake = make_upstream(tmp_path, UPSTREAM_FILES)
    Path(fake._distribution.locate_file("keras/src/x.py")).write_text("evil\n")
    with pytest.raises(upstream.UpstreamError, match="does not match"):
        assemble.assemble(tmp_path / "out", make_repo(tmp_path), upstream=fake)


@pytest.mark.parametrize("version", ["3.14.0", "3.15.1+torchdist"])
def test_refuses_other_upstream_versions(tmp_path, version):
    distribution = FakeDistribution(tmp_path, UPSTREAM_FILES, version=version)
    with pytest.raises(upstream.UpstreamError, match="3.15.1"):
        upstream.Upstream(distribution)
