"""README.md stays a short user's guide that tells the truth about the repository.

  (1) at most MAX_LINES lines;
  (2) its layout tree (the ```text block that starts with `llama_min/`) names exactly the packages directly
      under llama_min/ (folders with an __init__.py) and its top-level modules (__init__.py and __main__.py
      may be left out);
  (3) every `llama-min <command>` it shows is a real command (llama_min.cli.COMMANDS);
  (4) every image it links exists;
  (5) the quick start runs as shown: its commands (but the install, which .ci/run carries out the same way)
      print what its ```text block says; the stop-string example stops at its stop string.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llama_min.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PACKAGE = ROOT / "llama_min"
MAX_LINES = 450
OPTIONAL = {"__init__.py", "__main__.py"}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def layout_tree(text: str) -> list:
    """The names in the README's tree of llama_min/ (folders keep their trailing '/')."""
    blocks = re.findall(r"```text\n(llama_min/\n.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"expected one ```text block starting with 'llama_min/', found {len(blocks)}"
    names = []
    for line in blocks[0].splitlines()[1:]:
        if line.strip():
            assert line.startswith("  ") and not line.startswith("   "), f"not a package-level entry: {line!r}"
            names.append(line.split()[0])
    return names


def package_entries() -> set:
    folders = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.name for p in PACKAGE.glob("*.py")}
    return folders | modules


def test_readme_is_short():
    n = len(readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES}"


def tree_mismatch(shown: set, real: set):
    """(what the package has and the tree misses, what the tree names and the package lacks)"""
    return sorted(real - shown - OPTIONAL), sorted(shown - real)


def test_layout_tree_matches_the_package():
    names = layout_tree(readme())
    assert len(names) == len(set(names)), f"names repeated in the tree: {names}"
    missing, extra = tree_mismatch(set(names), package_entries())
    assert not missing and not extra, f"README tree: missing {missing}, names what does not exist {extra}"


def code(text: str) -> str:
    """The README's code: fenced blocks and inline `spans`, where commands are shown."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", rest))


def test_commands_are_real():
    shown = set(re.findall(r"(?<![\w-])llama-min[ \t]+([a-z][\w-]*)", code(readme())))
    assert shown, "the README shows no llama-min command"
    unknown = sorted(shown - set(COMMANDS))
    assert not unknown, f"README shows commands that do not exist: {unknown} (real: {sorted(COMMANDS)})"


def test_linked_images_exist():
    text = readme()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text) + re.findall(r"<img[^>]*\bsrc=\"([^\"]+)\"", text)
    assert images, "the README links no image"
    missing = [p for p in images if not (ROOT / p).is_file()]
    assert not missing, f"README links images that do not exist: {missing}"


def test_tree_check_notices_a_change():
    """A package added to or removed from llama_min/ (or from the tree) makes the check fail."""
    real = {"model.py", "errors.py", "cli/", "runtime/", "__init__.py"}
    tree = "```text\nllama_min/\n  model.py  the reference\n  errors.py  errors\n  cli/  the command\n" \
           "  runtime/  transforms\n```\n"
    names = set(layout_tree(tree))
    assert tree_mismatch(names, real) == ([], [])
    assert tree_mismatch(names, real | {"newpkg/"}) == (["newpkg/"], [])  # a folder added to the package
    assert tree_mismatch(names, real - {"cli/"}) == ([], ["cli/"])       # a folder removed from it


def needs_command() -> None:
    """Skip where the package is not installed (a bare checkout); under CI=true, where it is, never."""
    if shutil.which("llama-min") is None and os.environ.get("CI", "").lower() != "true":
        pytest.skip("the llama-min command is not installed (pip install -e .)")


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    return text[start : text.index("\n## ", start + 1)]


def shell(line: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def loose(line: str) -> str:
    """A regex for a shown stderr line: numbers and the cache path may differ from run to run."""
    pattern = re.escape(re.sub(r"\S*/\.cache/llama_min/", "CACHE/", line))
    return pattern.replace("CACHE/", r"\S*/").replace(r"190\.3", r"[\d.]+")


@pytest.mark.assets
def test_quick_start_runs_as_shown(smollm2_path):
    needs_command()
    quick = section(readme(), "Quick start")
    commands = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0].strip().splitlines()
    install = [c for c in commands if c.startswith("pip install")]
    assert len(install) == 1 and '"torch==2.13.0"' in install[0] and " -e ." in install[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet "torch==2.13.0"' in ci and 'pip install --quiet -e ".[dev]"' in ci
    shown = re.findall(r"```text\n(.*?)```", quick, flags=re.S)[0].splitlines()
    shown_err = [line for line in shown if line.startswith(("loading ", "["))]
    shown_out = [line for line in shown if line not in shown_err]
    for command in (c for c in commands if c not in install):
        r = shell(command.split("  #")[0])
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == shown_out
        err = r.stderr.splitlines()
        assert len(err) == len(shown_err) and all(re.fullmatch(loose(s), e) for s, e in zip(shown_err, err)), \
            (shown_err, err)


@pytest.mark.assets
def test_stop_string_example_stops_there(smollm2_path):
    needs_command()
    line = next(c for c in code(readme()).splitlines() if "--stop $'" in c)
    r = shell(line.split("  #")[0] + " -t 1")
    assert r.returncode == 0 and "[stopped: stop string]" in r.stderr.splitlines(), r.stderr
    assert "\n" not in r.stdout.rstrip("\n")  # stopped at the end of the answer's line, the newline not shown
