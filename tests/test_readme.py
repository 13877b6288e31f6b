"""The README's quickstart and .ci/run must stay the same commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_quickstart_is_two_commands_and_ci_runs_them():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    assert "fkv_jax.generate" in cmds[0] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in cmds:
        # CI adds only pip's -q flag
        assert cmd.replace("pip install ", "pip install -q ") in ci, cmd
