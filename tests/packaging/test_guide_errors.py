"""The guide's troubleshooting lists every error our code raises.

`docs/distributed_training_torch.md` promises, under "Troubleshooting",
every error message the distribution code raises, with its fix. This test
finds the messages in our modules and in the lines our patches add (an
exception built from a string, or a `cross_rank.check_same` call, which
raises "Every rank must have the same ...") and checks that the first
sentence of each, its placeholders matching any value, is in that
section. A new error without an entry there fails here.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs/distributed_training_torch.md"
# Placeholders of a message: an f-string's fields, or a value added to it.
FIELD = "\0"
# Errors that report a bug in this code rather than a user's mistake.
INTERNAL = {"AssertionError"}


def _template(node):
    """The text of a str constant, f-string or sum of them, fields as
    FIELD; None if `node` is none of these."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else FIELD
            for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return (left or FIELD) + (right or FIELD)
    return None


def _called_name(call):
    func = call.func
    return getattr(func, "id", None) or getattr(func, "attr", None) or ""


def _messages_in(tree):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = _called_name(node)
        if name == "check_same":
            what = _template(node.args[0])
            if what is not None:
                yield node.lineno, f"Every rank must have the same {what}"
        elif name.endswith("Error") and name not in INTERNAL:
            message = _template(node.args[0])
            if message is not None:
                yield node.lineno, message


def _patch_messages(patch):
    """Messages built in the lines a patch adds (the added lines of each
    hunk do not parse on their own, so string literals are read by
    pattern)."""
    added = "\n".join(
        line[1:]
        for line in patch.read_text().splitlines()
        if line.startswith("+") and not line.startswith("+++")
    )
    literal = r'f?"(?:[^"\\\n]|\\.)*"'
    pattern = rf"(\w+Error)\(\s*((?:{literal}\s*)+)"
    for match in re.finditer(pattern, added):
        if match.group(1) in INTERNAL:
            continue
        parts = re.findall(literal, match.group(2))
        text = "".join(ast.literal_eval(p.lstrip("f")) for p in parts)
        yield 0, re.sub(r"\{[^}]*\}", FIELD, text)


def error_messages():
    """(where, message) for every error message our code can raise."""
    found = []
    for path in sorted((REPO / "keras").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for line, message in _messages_in(tree):
            found.append((f"{path.relative_to(REPO)}:{line}", message))
    for patch in sorted((REPO / "patches").glob("*.patch")):
        for _, message in _patch_messages(patch):
            found.append((str(patch.relative_to(REPO)), message))
    return found


def _normalized(text):
    return " ".join(text.replace("`", "").replace("**", "").split())


def first_sentence(message):
    """The message up to its first full stop or colon before a space or
    a line break (the rest often lists values, or repeats the fix)."""
    match = re.search(r"[.:](\s|$)", message)
    return message[: match.start() + 1] if match else message


def pattern_for(sentence):
    """A regular expression matching `sentence` with any placeholders."""
    pieces = _normalized(sentence.replace(FIELD, " \0 ")).split("\0")
    return ".{1,120}?".join(re.escape(p.strip()) for p in pieces)


def troubleshooting():
    text = GUIDE.read_text()
    start = text.index("\n## Troubleshooting\n")
    end = text.find("\n## ", start + 1)
    return _normalized(text[start:end])


def test_finds_the_messages():
    messages = [message for _, message in error_messages()]
    assert len(messages) > 30, messages
    assert any(m.startswith("Every rank must have the same") for m in messages)
    # From a patch.
    assert any("`batch_dim_name` must be an axis" in m for m in messages)


def test_patterns_match_a_message_with_values():
    sentence = first_sentence(
        f"The DeviceMesh has {FIELD} devices (shape {FIELD}) but the world "
        f"has {FIELD} process(es). On the torch backend each process ..."
    )
    pattern = pattern_for(sentence)
    assert re.search(
        pattern,
        "The DeviceMesh has 3 devices (shape (3,)) but the world has "
        "2 process(es).",
    )
    assert not re.search(pattern, "The DeviceMesh has 3 devices.")


def test_every_error_message_is_in_the_guide():
    section = troubleshooting()
    missing = sorted(
        {
            f"{where}: {first_sentence(message)!r}"
            for where, message in error_messages()
            if not re.search(pattern_for(first_sentence(message)), section)
        }
    )
    assert not missing, (
        "Error messages missing from the guide's Troubleshooting section "
        "(docs/distributed_training_torch.md); add each, with its fix:\n"
        + "\n".join(missing)
    )
