"""The guide's Python snippets run, and give one process's numbers.

`workers/guide_snippets.py` runs every ```python block of
docs/distributed_training_torch.md in order, on 2 processes and on one,
then trains a fresh model under the distribution each one set. Compared:
the weights each snippet trained, and the fresh model's losses and
weights. The `sharding_summary` output the guide shows is what its
snippet prints on 2 processes.
"""

import re
from pathlib import Path

import pytest

from integration_tests.torch_distributed import launcher
from integration_tests.torch_distributed import parity

GUIDE = (
    Path(__file__).resolve().parents[2] / "docs/distributed_training_torch.md"
)
WORKER = "guide_snippets.py"


def _blocks():
    """`(code, why_not_run, continues)` for each Python block."""
    text = GUIDE.read_text()
    found = re.finditer(
        r"(?:<!-- (?:not run: (.*?)|(continues the block above)) -->\n)?"
        r"```python\n(.*?)```",
        text,
        re.S,
    )
    return [(m.group(3), m.group(1), bool(m.group(2))) for m in found]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("guide")
    args = ["--init", str(tmp_path / "init.npz")]
    reference = launcher.run_reference(WORKER, tmp_path, args)
    _, output, results = launcher.run_workers(WORKER, 2, tmp_path, args=args)
    return reference, results


def test_every_snippet_runs_or_says_why_not(runs):
    reference, results = runs
    blocks = _blocks()
    run = [i for i, (_, why, continues) in enumerate(blocks) if not continues]
    run = [i for i in run if not blocks[i][1]]
    skipped = [why for _, why, _ in blocks if why]
    # DataParallel, ModelParallel (with its summary), FSDP, a custom loop.
    assert len(run) == 4, blocks
    assert len(skipped) == 1 and "preset" in skipped[0], skipped
    for rank_results in (reference, *results):
        ran = sorted(
            int(k.split("/")[0][len("snippet") :])
            for k in rank_results
            if k.endswith("/loss")
        )
        assert ran == run


def test_snippets_give_one_process_numbers(runs):
    reference, results = runs
    prefixes = [
        f"snippet{i}/{kind}"
        for i in range(len(_blocks()))
        for kind in ("weight:", "trained:", "loss")
    ]
    compared = parity.assert_results_match(results, reference, prefixes)
    # The DataParallel snippet's and the custom loop's models, and a fresh
    # model (4 weights and its losses) after each of the 4 snippets.
    assert compared == 2 * 4 + 4 * 5, compared


def test_the_guide_shows_what_sharding_summary_prints(runs):
    _, results = runs
    text = GUIDE.read_text()
    shown = re.search(
        r"sharding_summary\(model\)\n```\n\nprints, on 2 processes:\n\n```\n"
        r"(.*?)```",
        text,
        re.S,
    ).group(1)
    printed = [str(v) for k, v in results[0].items() if k.endswith("/printed")]
    summaries = [p for p in printed if p.startswith("Sharding of model")]
    assert summaries == [shown], (summaries, shown)
    # Process 0 prints it; the other does not.
    assert not any(
        str(v).startswith("Sharding")
        for k, v in results[1].items()
        if k.endswith("/printed")
    )
