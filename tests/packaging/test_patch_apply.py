import pytest

from build_tools import patch_apply

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 21))

TWO_HUNKS = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -2,3 +2,4 @@
 line 2
 line 3
+inserted after 3
 line 4
@@ -15,3 +16,3 @@
 line 15
-line 16
+line sixteen
 line 17
"""


def apply(patch_text, text=ORIGINAL):
    (file_patch,) = patch_apply.parse(patch_text, "test.patch")
    return patch_apply.apply_to_text(text, file_patch, "test.patch")


def test_applies_several_hunks_at_their_lines():
    result = apply(TWO_HUNKS).splitlines()
    assert result[3] == "inserted after 3"
    assert result[16] == "line sixteen"
    assert "line 16" not in result
    assert len(result) == 21


def test_mismatch_names_patch_file_hunk_and_line():
    changed = ORIGINAL.replace("line 16\n", "line 16 changed upstream\n")
    with pytest.raises(patch_apply.PatchError) as error:
        apply(TWO_HUNKS, changed)
    message = str(error.value)
    assert "test.patch" in message and "keras/x.py" in message
    assert "@@ -15,3 +16,3 @@" in message
    assert "'line 16'" in message and "'line 16 changed upstream'" in message


def test_no_offset_search_even_if_context_exists_elsewhere():
    shifted = "new first line\n" + ORIGINAL
    with pytest.raises(patch_apply.PatchError, match="does not apply"):
        apply(TWO_HUNKS, shifted)


def test_no_newline_at_end_of_file():
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -1,2 +1,2 @@
 a
-b
\\ No newline at end of file
+c
\\ No newline at end of file
"""
    assert apply(patch, "a\nb") == "a\nc"


def test_header_count_must_match_body():
    patch = TWO_HUNKS.replace("@@ -2,3 +2,4 @@", "@@ -2,5 +2,6 @@")
    with pytest.raises(patch_apply.PatchError, match="line counts"):
        patch_apply.parse(patch, "test.patch")


def test_new_files_are_refused():
    patch = "--- /dev/null\n+++ b/keras/new.py\n@@ -0,0 +1 @@\n+x\n"
    with pytest.raises(patch_apply.PatchError, match="overlay"):
        patch_apply.parse(patch, "test.patch")


def test_mismatch_at_end_of_file_is_reported():
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -20,2 +20,2 @@
 line 20
-gone
+new
"""
    with pytest.raises(patch_apply.PatchError, match="found end of file"):
        apply(patch)


def test_removed_line_starting_with_dashes_is_not_a_file_header():
    text = "a\n-- b\n++ c\nd\n"
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -1,4 +1,4 @@
 a
--- b
-++ c
++++ c2
+--- b2
 d
"""
    assert apply(patch, text) == "a\n+++ c2\n--- b2\nd\n"


def test_newline_restored_at_end_of_file():
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -1,2 +1,2 @@
 a
-b
\\ No newline at end of file
+b
"""
    assert apply(patch, "a\nb") == "a\nb\n"


def test_no_newline_marker_must_match_the_file():
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -1,2 +1,2 @@
 a
-b
\\ No newline at end of file
+c
"""
    with pytest.raises(patch_apply.PatchError, match="without a newline"):
        apply(patch, "a\nb\n")


def test_several_files_in_one_patch():
    patch = """\
--- a/keras/x.py
+++ b/keras/x.py
@@ -1 +1 @@
-line 1
+first
--- a/keras/y.py
+++ b/keras/y.py
@@ -0,0 +1 @@
+prepended
"""
    x, y = patch_apply.parse(patch, "test.patch")
    assert (x.path, y.path) == ("keras/x.py", "keras/y.py")
    assert patch_apply.apply_to_text(ORIGINAL, x).startswith("first\nline 2")
    assert patch_apply.apply_to_text("z\n", y) == "prepended\nz\n"


def test_only_line_feeds_split_lines():
    # A form feed or U+2028 inside a line must not split it.
    text = "a\x0cb\nc\u2028d\n"
    patch = "--- a/k/x\n+++ b/k/x\n@@ -2 +2 @@\n-c\u2028d\n+e\n"
    assert apply(patch, text) == "a\x0cb\ne\n"
