"""The README's commands and code are the ones that run: the quickstart is what .ci/run runs, the policy example
is executed from the README text itself, and the commands it names exist."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands():
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_quickstart_is_two_commands_and_ci_runs_them():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    assert "fkv_jax.generate" in cmds[0] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in cmds:
        # CI adds only pip's -q flag
        assert cmd.replace("pip install ", "pip install -q ") in ci, cmd


def test_policy_example_runs_from_the_readme_text():
    """The 'Writing a policy' block, extracted and executed as it stands (nothing defined elsewhere)."""
    section = README[README.index("### Writing a policy") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md#writing-a-policy", "exec"), ns)  # noqa: S102 - our own README
    lat = ns["latents"]
    assert lat.shape == (1, 18, 16, 8, 12) and np.isfinite(lat).all()
    assert type(ns["sampler"].policy).__name__ == "SinkDiverseTopK" and ns["sampler"].trace_count == 1


def _readme_commands(prefix: str):
    """Every README command line that starts with ``prefix`` (code blocks, joined continuation lines)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("#")[0].strip()
            if cmd.startswith(prefix):
                out.append(cmd)
    return out


def test_readme_generate_flags_exist():
    """Every flag and preset name a README generate / fkv command uses is one the parser knows."""
    from fkv_jax.cli.generate import build_parser

    parser = build_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    cmds = _readme_commands("python -m fkv_jax.generate") + _readme_commands("fkv generate")
    assert cmds
    for cmd in cmds:
        flags = {w.split("=")[0] for w in shlex.split(cmd) if w.startswith("--")}
        assert flags <= known, (cmd, flags - known)
    from fkv_jax.cli.common import preset_name
    from fkv_jax.config import list_presets

    for name in re.findall(r"--model-preset ([\w.\-]+)", README):
        assert preset_name(name) in list_presets("models"), name


@pytest.mark.parametrize("phrase", ["the real latent shapes", "48 frames of a red circle and a blue square moving"])
def test_claims_the_code_contradicts_are_gone(phrase):
    assert phrase not in README


def test_frame_strip_is_shipped():
    png = ROOT / "docs" / "quickstart_strip.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/quickstart_strip.png" in README
