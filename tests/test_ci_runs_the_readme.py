"""CI (.ci/run) runs the README's quick start verbatim: the commands come from README.md itself, and .ci/run runs
no install, build, training or test command of its own that could make CI and the README drift apart."""

import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
while not os.path.isfile(os.path.join(ROOT, "README.md")):
    ROOT = os.path.dirname(ROOT)


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", os.path.join(ROOT, ".ci", "readme_commands.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_start_is_a_fresh_user_path():
    lines = _readme_commands().section_commands("Quick start")
    commands = [line.split("#")[0].strip() for line in lines]
    assert commands == [
        "python3.12 -m venv .venv && source .venv/bin/activate",   # the venv inside the clone, as users make it
        "pip install -r requirements.txt -r requirements-test.txt && pip install --no-build-isolation -e .",
        "k2-pretrain",
        "python -m pytest tests -q",
    ], lines
    # the "Tests" section documents the same test command first (then narrower ones: the fast loop, one package)
    tests_section = [line.split("#")[0].strip() for line in _readme_commands().section_commands("Tests")]
    assert tests_section[0] == "python -m pytest tests -q", tests_section


def test_ci_runs_exactly_the_readme_quick_start():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    code = "\n".join(line.split("#")[0] for line in script.splitlines())
    assert 'readme_commands.py "Quick start"' in code
    assert re.search(r'for line in "\$\{quickstart\[@\]\}"; do', code) and 'eval "$line"' in code
    # nothing that installs, builds, trains or tests outside the README's commands (the extension check after the
    # install line only imports), and no virtualenv of CI's own
    statements = re.split(r"[;&|\n]|\$\(|\bthen\b|\bdo\b", code)
    for statement in statements:
        words = statement.split()
        executed = " ".join(words[:4])
        for forbidden in ("pip install", "pytest", "-m venv", "virtualenv", "k2-pretrain", "setup.py"):
            assert forbidden not in executed, statement


def test_extractor_prints_the_block_verbatim(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Quick start\n\ntext\n\n```bash\na && b   # c\n\nd\n```\n\n```bash\nlater\n```\n"
                      "## Next\n\n```bash\nother\n```\n")
    assert _readme_commands().section_commands("Quick start", str(readme)) == ["a && b   # c", "d"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "readme_commands.py"), "No such"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no section '## No such'" in out.stderr
