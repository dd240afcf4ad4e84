"""A strict unified-diff applier, in pure Python.

A hunk applies only where its header says, with every context and removed
line matching exactly; anything else fails with the patch, the file, the
hunk and the first line that differs. There is no fuzz and no offset search:
a patch that no longer fits upstream must be regenerated (CONTRIBUTING.md).
"""

import re

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    """A patch is malformed or does not apply."""


class Hunk:
    def __init__(self, header, old_start, old_count, lines):
        self.header = header
        self.old_start = old_start
        self.old_count = old_count
        # (kind, text, has_newline) with kind in " ", "-", "+".
        self.lines = lines


class FilePatch:
    def __init__(self, path):
        self.path = path
        self.hunks = []


def _strip_prefix(name, prefix, patch_name):
    name = name.split("\t")[0].strip()
    if name == "/dev/null":
        raise PatchError(
            f"{patch_name}: creates or deletes {name}. Patches only change "
            "upstream files; new files belong in the repository's keras/ "
            "tree (the overlay)."
        )
    if not name.startswith(prefix):
        raise PatchError(
            f"{patch_name}: expected a path starting with {prefix!r}, "
            f"found {name!r}."
        )
    return name[len(prefix) :]


def parse(text, patch_name="<patch>"):
    """Parse a unified diff into a list of `FilePatch`."""
    lines = text.splitlines(keepends=True)
    files, current, hunk = [], None, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- "):
            if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
                raise PatchError(f"{patch_name}: '---' without '+++'.")
            old = _strip_prefix(line[4:], "a/", patch_name)
            new = _strip_prefix(lines[i + 1][4:], "b/", patch_name)
            if old != new:
                raise PatchError(
                    f"{patch_name}: renames are not supported ({old} -> {new})."
                )
            current, hunk = FilePatch(old), None
            files.append(current)
            i += 2
            continue
        match = _HUNK.match(line)
        if match:
            if current is None:
                raise PatchError(f"{patch_name}: hunk before a file header.")
            old_start = int(match.group(1))
            old_count = int(match.group(2) or 1)
            hunk = Hunk(line.rstrip("\n"), old_start, old_count, [])
            current.hunks.append(hunk)
            i += 1
            continue
        if hunk is not None and line[:1] in (" ", "-", "+"):
            hunk.lines.append([line[0], line[1:].rstrip("\n"), True])
        elif hunk is not None and line.startswith("\\"):
            if not hunk.lines:
                raise PatchError(f"{patch_name}: misplaced '\\' line.")
            hunk.lines[-1][2] = False
        elif hunk is not None and line in ("\n", ""):
            # A blank context line whose leading space was stripped.
            hunk.lines.append([" ", "", True])
        # Anything else (diff --git, index, comments) is ignored.
        i += 1
    for file_patch in files:
        for h in file_patch.hunks:
            old_len = sum(1 for kind, _, _ in h.lines if kind != "+")
            if old_len != h.old_count:
                raise PatchError(
                    f"{patch_name}: {file_patch.path} {h.header} has "
                    f"{old_len} old lines, its header says {h.old_count}."
                )
    return files


def _split_lines(text):
    """Lines without newlines, and whether the file ends with one."""
    if not text:
        return [], True
    ends_with_newline = text.endswith("\n")
    lines = text.split("\n")
    if ends_with_newline:
        lines.pop()
    return lines, ends_with_newline


def apply_to_text(text, file_patch, patch_name="<patch>"):
    """Apply one `FilePatch` to `text`, strictly; return the new text."""
    lines, ends_with_newline = _split_lines(text)
    output, position = [], 0
    for hunk in file_patch.hunks:
        start = hunk.old_start - 1 if hunk.old_count else hunk.old_start
        if start < position:
            raise PatchError(
                f"{patch_name}: {file_patch.path} {hunk.header} overlaps "
                "the previous hunk."
            )
        output.extend(lines[position:start])
        cursor = start
        for kind, expected, has_newline in hunk.lines:
            if kind == "+":
                output.append(expected)
                if not has_newline:
                    ends_with_newline = False
                continue
            found = lines[cursor] if cursor < len(lines) else None
            if found != expected:
                raise PatchError(
                    f"{patch_name}: {file_patch.path} {hunk.header} does not "
                    f"apply at line {cursor + 1}: expected {expected!r}, "
                    f"found {found!r}."
                )
            if kind == " ":
                output.append(expected)
            cursor += 1
        position = cursor
    output.extend(lines[position:])
    result = "\n".join(output)
    if output and ends_with_newline:
        result += "\n"
    return result
