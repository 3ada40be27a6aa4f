"""The repository keeps its promises to a newcomer: CI runs exactly the README's commands."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_commands():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in _readme_commands():
        assert command in ci_lines, f".ci/run does not run the README command: {command}"


def test_readme_usage_example_runs():
    """The README's main example is code a newcomer pastes: it must run as written (on the CPU here)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use", 1)[1].split("\n## ", 1)[0]
    example = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]
    exec(compile(example, "README.md", "exec"), {})


def test_readme_integrations_example_runs():
    """The README's integrations snippet runs as written too (tiny random-weight models, offline)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert len(examples) == 2, "the Use section has the ops example and the integrations example"
    exec(compile(examples[1], "README.md", "exec"), {})
