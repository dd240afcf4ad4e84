"""The guide's example commands run as written, from the repository root.

Every `torchrun ... examples/<script>.py` command in the guide's fenced
bash blocks is run (torchrun from this Python's environment, one OpenMP
thread per process, a hard timeout), and each script must succeed on every
process and print what it promises. The resume example's checkpoint folder
is moved into the test's temporary folder.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from integration_tests.torch_distributed import launcher

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "distributed_training_torch.md"
# What each example prints on every process, as a regular expression.
EXPECTED = {
    "image_classification_data_parallel.py": r"test loss [\d.]+, accuracy",
    "transformer_lm_model_parallel.py": r"next-token loss [\d.]+, accuracy",
    "keras_hub_backbone_model_parallel.py": r"generated \[",
    "mesh_2d.py": r"hidden/kernel \(32, 128\): shard \(32, 64\)",
    "resume_from_checkpoint.py": r"attempt 2: trained epochs \[3, 4\]",
}
PROCESSES = {"mesh_2d.py": 4}


def guide_commands():
    """`{script: command}` for each example command of the guide."""
    commands = {}
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            match = re.search(r"examples/(\w+\.py)", line)
            if line.startswith("torchrun ") and match:
                commands[match.group(1)] = line
    return commands


def test_the_guide_has_a_command_for_every_example():
    examples = {p.name for p in (REPO / "examples").glob("*.py")} - {
        "distributed_demo.py"
    }  # The demo runs as the main job.
    assert set(guide_commands()) == examples == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_guide_example_runs_as_written(script, tmp_path):
    command = guide_commands()[script].replace(
        "/tmp/resume-demo", str(tmp_path)
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    process = subprocess.Popen(
        shlex.split(command),
        cwd=REPO,
        env=launcher._environment(tmp_path, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        launcher.kill_tree(process.pid)
        output, _ = process.communicate()
        raise AssertionError(f"{command} timed out:\n{output}")
    assert process.returncode == 0, f"{command}\n{output}"
    for rank in range(PROCESSES.get(script, 2)):
        assert re.search(rf"\[rank {rank}\] {EXPECTED[script]}", output), (
            rank,
            output,
        )
    assert not launcher.leftover_processes(tmp_path)
