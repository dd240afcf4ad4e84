"""A strict unified-diff applier, in pure Python.

A hunk applies only where its header says, with every context and removed
line matching exactly; anything else fails with the patch, the file, the
hunk and the first line that differs. There is no fuzz and no offset search:
a patch that no longer fits upstream must be regenerated (CONTRIBUTING.md).

Hunk bodies are read by the line counts of their headers, so a removed line
that starts with `-- ` is never taken for a file header. Lines are split on
`\\n` only, as `diff` and `git diff` do.
"""

import re

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NO_NEWLINE = "\\"


class PatchError(ValueError):
    """A patch is malformed or does not apply."""


class Hunk:
    """One `@@` block: its header and its lines.

    `lines` holds `[kind, text, has_newline]` with kind one of `" "`, `"-"`,
    `"+"`; `has_newline` is False after a `\\ No newline at end of file`.
    """

    def __init__(self, header, old_start, old_count, new_count):
        self.header = header
        self.old_start = old_start
        self.old_count = old_count
        self.new_count = new_count
        self.lines = []


class FilePatch:
    """The hunks of one file, in order."""

    def __init__(self, path):
        self.path = path
        self.hunks = []


def _strip_prefix(name, prefix, patch_name):
    name = name.split("\t")[0].rstrip("\r").strip()
    if name == "/dev/null":
        raise PatchError(
            f"{patch_name}: creates or deletes a file (/dev/null). Patches "
            "only change upstream files; a new file belongs in the "
            "repository's keras/ tree (the overlay)."
        )
    if not name.startswith(prefix):
        raise PatchError(
            f"{patch_name}: expected a path starting with {prefix!r}, "
            f"found {name!r}. Regenerate the patch with "
            "`python -m build_tools.patch_workspace export`."
        )
    return name[len(prefix) :]


def _read_hunk(lines, i, hunk, where):
    """Read `hunk`'s body from `lines[i:]`; return the index after it."""
    old_left, new_left = hunk.old_count, hunk.new_count
    while old_left or new_left:
        if i >= len(lines):
            raise PatchError(
                f"{where} {hunk.header}: the patch ends inside the hunk "
                f"({old_left} old and {new_left} new lines missing)."
            )
        line = lines[i]
        kind, text = line[:1], line[1:]
        if line == "":
            # A blank context line whose leading space was stripped.
            kind, text = " ", ""
        if kind not in (" ", "-", "+"):
            raise PatchError(
                f"{where} {hunk.header}: unexpected line {line!r} with "
                f"{old_left} old and {new_left} new lines still to come; "
                "the header's line counts do not match its body."
            )
        if kind in (" ", "-"):
            old_left -= 1
        if kind in (" ", "+"):
            new_left -= 1
        if old_left < 0 or new_left < 0:
            raise PatchError(
                f"{where} {hunk.header}: more lines than the header counts."
            )
        hunk.lines.append([kind, text, True])
        i += 1
        if i < len(lines) and lines[i].startswith(_NO_NEWLINE):
            hunk.lines[-1][2] = False
            i += 1
    return i


def parse(text, patch_name="<patch>"):
    """Parse a unified diff.

    Args:
        text: The patch text.
        patch_name: Name used in error messages (the patch file's name).

    Returns:
        A list of `FilePatch`, in the order they appear.

    Raises:
        PatchError: The patch is malformed, renames a file, or creates or
            deletes one.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    files, current = [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines):
            if not lines[i + 1].startswith("+++ "):
                raise PatchError(f"{patch_name}: '---' without '+++'.")
            old = _strip_prefix(line[4:], "a/", patch_name)
            new = _strip_prefix(lines[i + 1][4:], "b/", patch_name)
            if old != new:
                raise PatchError(
                    f"{patch_name}: renames are not supported ({old} -> {new})."
                )
            current = FilePatch(old)
            files.append(current)
            i += 2
            continue
        match = _HUNK.match(line)
        if match:
            if current is None:
                raise PatchError(f"{patch_name}: hunk before a file header.")
            hunk = Hunk(
                line.rstrip("\r"),
                old_start=int(match.group(1)),
                old_count=int(match.group(2) or 1),
                new_count=int(match.group(4) or 1),
            )
            current.hunks.append(hunk)
            i = _read_hunk(lines, i + 1, hunk, f"{patch_name}: {current.path}")
            continue
        if line.startswith("Binary files ") or line.startswith("GIT binary"):
            raise PatchError(f"{patch_name}: binary patches are not supported.")
        # Anything else (diff --git, index, mode lines, prose) is ignored.
        i += 1
    for file_patch in files:
        if not file_patch.hunks:
            raise PatchError(
                f"{patch_name}: {file_patch.path} has a header but no hunk."
            )
    return files


def _split_lines(text):
    """Lines without newlines, and whether the text ends with one."""
    if not text:
        return [], True
    lines = text.split("\n")
    ends_with_newline = lines[-1] == ""
    if ends_with_newline:
        lines.pop()
    return lines, ends_with_newline


def apply_to_text(text, file_patch, patch_name="<patch>"):
    """Apply one `FilePatch` to `text`, strictly.

    Each hunk must match at the line its header states (headers count lines
    of the original file, so earlier hunks in the same file shift nothing).

    Args:
        text: The file's current text.
        file_patch: A `FilePatch` from `parse`.
        patch_name: Name used in error messages.

    Returns:
        The patched text.

    Raises:
        PatchError: A hunk does not match exactly where it says.
    """
    lines, ends_with_newline = _split_lines(text)
    where = f"{patch_name}: {file_patch.path}"
    output, position = [], 0
    for hunk in file_patch.hunks:
        # `-N,0` means "insert after line N"; otherwise N is 1-based.
        start = hunk.old_start if hunk.old_count == 0 else hunk.old_start - 1
        if start < position:
            raise PatchError(
                f"{where} {hunk.header} overlaps or precedes the previous "
                "hunk; hunks must be in file order."
            )
        if start > len(lines):
            raise PatchError(
                f"{where} {hunk.header} starts at line {hunk.old_start} but "
                f"the file has {len(lines)} lines."
            )
        output.extend(lines[position:start])
        cursor = start
        new_last_has_newline = None
        for kind, expected, has_newline in hunk.lines:
            if kind == "+":
                output.append(expected)
                new_last_has_newline = has_newline
                continue
            found = lines[cursor] if cursor < len(lines) else None
            at_end = cursor == len(lines) - 1
            if found != expected:
                shown = "end of file" if found is None else repr(found)
                raise PatchError(
                    f"{where} {hunk.header} does not apply at line "
                    f"{cursor + 1}: expected {expected!r}, found {shown}. "
                    "Upstream changed; regenerate the patch (CONTRIBUTING.md)."
                )
            if has_newline is False and not (at_end and not ends_with_newline):
                raise PatchError(
                    f"{where} {hunk.header} does not apply at line "
                    f"{cursor + 1}: the patch says the file ends there "
                    "without a newline; it does not."
                )
            if kind == " ":
                output.append(expected)
                new_last_has_newline = has_newline
            cursor += 1
        position = cursor
        if position == len(lines) and new_last_has_newline is not None:
            # The hunk reaches the end: its new side decides the last newline.
            ends_with_newline = new_last_has_newline
    output.extend(lines[position:])
    result = "\n".join(output)
    if output and ends_with_newline:
        result += "\n"
    return result
