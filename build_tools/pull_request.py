"""The fork as one unified diff against the pinned upstream Keras.

    python -m build_tools.pull_request export OUT.diff
    python -m build_tools.pull_request check OUT.diff

A pull request to keras-team/keras is one change to its tree; this writes
the fork in that form. For every upstream file the patch series changes,
one section takes it from pristine to its state after the whole series;
for every file of the repository's `keras/` tree, one section creates it.
Paths are `keras/...`, which is where the files live both in the wheel and
at the root of the keras-team/keras repository at the pinned release, so
the diff applies there with `git apply OUT.diff` (or `patch -p1`).

`check` applies a diff to a pristine upstream tree with the build's own
strict applier (new files are written from their added lines) and compares
the result, byte for byte, with the fork the build assembles. The build
itself never uses this module.
"""

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

from build_tools import assemble
from build_tools import patch_apply
from build_tools import patch_workspace

REPO = Path(__file__).resolve().parent.parent
_NO_NEWLINE = "\\ No newline at end of file\n"
_SECTION = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.MULTILINE)


class PullRequestError(RuntimeError):
    """A diff does not reproduce the assembled fork."""


def _lines(text):
    """Lines with their newlines; a last line without one is marked."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n" + _NO_NEWLINE
    return lines


def _modified(path, old, new):
    body = difflib.unified_diff(
        _lines(old), _lines(new), f"a/{path}", f"b/{path}", n=3
    )
    return f"diff --git a/{path} b/{path}\n" + "".join(body)


def _created(path, text):
    header = f"diff --git a/{path} b/{path}\nnew file mode 100644\n"
    lines = _lines(text)
    if not lines:
        return header
    hunk = "".join(
        line if line == _NO_NEWLINE else "+" + line for line in lines
    )
    count = len(lines) - lines.count(_NO_NEWLINE)
    return f"{header}--- /dev/null\n+++ b/{path}\n@@ -0,0 +1,{count} @@\n{hunk}"


def _pristine_files(upstream=None):
    if upstream is not None:
        return {path: upstream.read(path) for path in upstream.paths()}
    with tempfile.TemporaryDirectory() as folder:
        patch_workspace._write_upstream(Path(folder))
        return {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        }


def _patched(files, repo):
    """Upstream files after the whole series, as `{path: text}`."""
    patched = {}
    for patch_path in assemble.read_series(repo):
        text = patch_path.read_bytes().decode("utf-8")
        for file_patch in patch_apply.parse(text, patch_path.name):
            old = patched.get(file_patch.path)
            if old is None:
                old = files[file_patch.path].decode("utf-8")
            patched[file_patch.path] = patch_apply.apply_to_text(
                old, file_patch, patch_path.name
            )
    return patched


def render(repo=REPO, upstream=None):
    """The fork as one unified diff against pristine upstream.

    Args:
        repo: The repository root (`keras/`, `patches/`).
        upstream: An `upstream.Upstream`; defaults to the installed pinned
            release, else one downloaded (as `patch_workspace` does).

    Returns:
        The diff, as text.
    """
    repo = Path(repo)
    files = _pristine_files(upstream)
    sections = [
        _modified(path, files[path].decode("utf-8"), text)
        for path, text in sorted(_patched(files, repo).items())
    ]
    for path in assemble.overlay_files(repo):
        if path in files:
            raise PullRequestError(f"{path} is an upstream file.")
        sections.append(
            _created(path, (repo / path).read_bytes().decode("utf-8"))
        )
    return "".join(sections)


def _sections(diff):
    starts = [match.start() for match in _SECTION.finditer(diff)]
    for begin, end in zip(starts, starts[1:] + [len(diff)]):
        yield _SECTION.match(diff, begin).group(2), diff[begin:end]


def _new_file_text(section):
    _, _, hunk = section.partition("@@ -0,0 +")
    if not hunk:
        return ""
    body = hunk.split("\n", 1)[1]
    text, previous = [], None
    for line in body.splitlines(keepends=True):
        if line == _NO_NEWLINE and previous is not None:
            text[-1] = text[-1][:-1]
        else:
            text.append(line[1:])
        previous = line
    return "".join(text)


def apply(diff, files):
    """Apply an exported diff to pristine files.

    Args:
        diff: Text from `render`.
        files: `{path: bytes}` of pristine upstream.

    Returns:
        `{path: bytes}` after the diff.
    """
    result = dict(files)
    for path, section in _sections(diff):
        if "\nnew file mode " in section.split("@@", 1)[0]:
            if path in result:
                raise PullRequestError(
                    f"The diff creates {path}, which exists."
                )
            result[path] = _new_file_text(section).encode("utf-8")
            continue
        body = section.split("\n", 1)[1]
        for file_patch in patch_apply.parse(body, "the exported diff"):
            text = result[file_patch.path].decode("utf-8")
            result[file_patch.path] = patch_apply.apply_to_text(
                text, file_patch, "the exported diff"
            ).encode("utf-8")
    return result


def check(diff, repo=REPO, upstream=None):
    """Raise unless `diff` applied to pristine upstream is the fork.

    Returns:
        The number of files compared.
    """
    files = _pristine_files(upstream)
    applied = apply(diff, files)
    with tempfile.TemporaryDirectory() as folder:
        fake = _FilesUpstream(files) if upstream is None else upstream
        assemble.assemble(folder, repo, upstream=fake)
        built = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in Path(folder).rglob("*")
            if path.is_file()
        }
    built.pop(assemble.MANIFEST)
    differ = sorted(
        path
        for path in set(built) | set(applied)
        if built.get(path) != applied.get(path)
    )
    if differ:
        raise PullRequestError(
            f"The diff does not reproduce the assembled fork: {len(differ)} "
            f"file(s) differ, e.g. {differ[:5]}."
        )
    return len(built)


class _FilesUpstream:
    """Pristine files already read (and checked) as an `Upstream`."""

    def __init__(self, files):
        self._files = files

    def paths(self):
        return sorted(self._files)

    def read(self, path):
        return self._files[path]

    @property
    def version(self):
        return assemble.upstream_lib.UPSTREAM_VERSION

    @property
    def hashes(self):
        return {
            path: assemble.upstream_lib.sha256_hex(data)
            for path, data in self._files.items()
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["export", "check"])
    parser.add_argument("diff", help="The diff file to write or check.")
    args = parser.parse_args(argv)
    path = Path(args.diff)
    if args.command == "export":
        diff = render()
        path.write_text(diff, encoding="utf-8")
        sections = len(list(_sections(diff)))
        print(
            f"Wrote {path}: {sections} files, {len(diff.splitlines())} lines."
        )
    else:
        count = check(path.read_text(encoding="utf-8"))
        print(f"{path} reproduces the assembled fork ({count} files).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
