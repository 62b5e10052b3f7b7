"""Packaging: what a `pip install` of this checkout holds, and that its commands run away from the checkout.

The slow tests install the package with `pip install --no-deps --no-build-isolation --target TMP` from a copy
of the sources (no network: the build uses the setuptools already installed), then run the `llama-min`
commands with PYTHONPATH=TMP from another folder, so nothing of the checkout can help them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def declared_packages() -> tuple:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setup["packages"], setup.get("package-dir", {}), setup.get("package-data", {})


def test_every_subpackage_is_declared():
    """A folder of llama_min/ with an __init__.py that pyproject.toml does not list would be missing from wheels."""
    packages, package_dir, package_data = declared_packages()
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llama_min").rglob("__init__.py")}
    assert found <= set(packages), f"add to [tool.setuptools] packages: {sorted(found - set(packages))}"
    assert package_dir == {"llama_min.configs": "configs"}
    assert package_data == {"llama_min.runtime.native": ["*.c"], "llama_min.configs": ["*.json"]}  # kernels_avx2.c, the configs


def test_bundled_config_names_resolve_in_a_checkout():
    from llama_min.train.config import resolve_model_config

    assert resolve_model_config("tiny") == ROOT / "configs" / "tiny.json"
    assert resolve_model_config("no-such-config") == Path("no-such-config")  # the reader reports it missing
    assert resolve_model_config("my.json") == Path("my.json")


# ------------------------------------------------------------------------------------------------ installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, environment, a working folder outside the checkout) of a fresh install."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building offline needs setuptools >= 77 installed (have {setuptools.__version__})")
    tmp = tmp_path_factory.mktemp("install")
    src, target, work = tmp / "src", tmp / "site", tmp / "work"
    src.mkdir()
    work.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    for folder in ("llama_min", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    return target, env, work


def run(installed, *argv, timeout=600):
    _, env, work = installed
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=work,
                          timeout=timeout)


@pytest.mark.slow
def test_install_has_the_package_configs_and_console_script(installed):
    target, _, _ = installed
    assert sorted(p.name for p in (target / "llama_min" / "configs").glob("*.json")) == \
        sorted(p.name for p in (ROOT / "configs").glob("*.json"))
    assert (target / "llama_min" / "cli" / "__init__.py").is_file()
    assert (target / "llama_min" / "formats" / "__init__.py").is_file()
    assert (target / "llama_min" / "runtime" / "native" / "kernels_avx2.c").is_file()  # compiled on first use
    script = target / "bin" / "llama-min"
    assert script.is_file() and "from llama_min.cli import program" in script.read_text()
    r = run(installed, sys.executable, "-c", "import llama_min, llama_min.train.config as t; "
            "print(llama_min.__file__); print(t.resolve_model_config('tiny'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(target / "llama_min" / "__init__.py"),
                                str(target / "llama_min" / "configs" / "tiny.json")]


@pytest.mark.slow
@pytest.mark.assets
def test_installed_generate_runs_the_default_model(installed, require_asset):
    require_asset("smollm2")  # cached: the installed command finds it without a download
    r = run(installed, sys.executable, "-m", "llama_min", "generate", "-p", "The capital of France is", "-n", "3",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and "generated 3 tok" in r.stderr


@pytest.mark.slow
def test_installed_train_runs_two_steps_from_a_bundled_config(installed):
    _, _, work = installed
    words = "the king queen night day love heart sword crown river light dark sweet fair old young".split()
    lines = [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(6 + i % 7)) + "." for i in range(400)]
    (work / "text.txt").write_text("\n".join(lines) + "\n")
    r = run(installed, installed[0] / "bin" / "llama-min", "train", "--config", "tiny", "--data", "text.txt",
            "--out", "run", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
            "--sample-tokens", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 and (work / "run" / "final" / "model.safetensors").is_file()
