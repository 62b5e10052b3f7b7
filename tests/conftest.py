"""Shared test helpers.

``require_asset(name)``: the cached path of a fetched asset (``python -m llama_min.assets fetch``). A
missing asset skips the test locally but fails it under CI (env ``CI=true``), where .ci/run fetches them.
"""

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Packed GGUF loads cache their converted layouts in the user's cache folder (runtime/layout_cache.py): the
# tests' throwaway files would leave layouts behind, and memory tests measure the conversion. Off for the
# session (child processes inherit it); tests/test_layout_cache.py turns it on in a folder of its own.
os.environ.setdefault("LLAMA_MIN_LAYOUT_CACHE", "0")


def require_asset(name: str) -> Path:
    """Path of asset ``name``; skip (locally) or fail (CI=true) when it has not been fetched."""
    from llama_min.assets import asset_path

    try:
        return asset_path(name, fetch=False)
    except FileNotFoundError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"asset missing in CI: {err}")
        pytest.skip(str(err))


@pytest.fixture(name="require_asset", scope="session")
def require_asset_fixture():
    """The ``require_asset`` helper as a fixture (usable from fixtures of any scope)."""
    return require_asset


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The committed test fixtures folder (tests/fixtures)."""
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct, Q4_1)."""
    return require_asset("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct as a float32 CPU `Llama`, built once for the whole session."""
    import torch

    from llama_min import Llama

    return Llama.build(smollm2_path, max_seq_len=256, max_batch_size=4, device="cpu", dtype=torch.float32)


def use_int4_kernel(monkeypatch, which: str):
    """Make new 4-bit CPU layers use `which` kernel: "avx2" (llama_min/runtime/native/) or "torch" (PyTorch's).

    "avx2" where it cannot be built skips locally and fails under CI (env CI=true), like require_asset.
    """
    from llama_min.runtime import native

    if which == "torch":
        monkeypatch.setenv("LLAMA_MIN_NATIVE", "0")
        return
    monkeypatch.delenv("LLAMA_MIN_NATIVE", raising=False)
    if not native.enabled():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the AVX2 4-bit kernel is not available on the CI machine")
        pytest.skip("the AVX2 4-bit kernel is not available here")


class CallCounter:
    """Wraps llama_min.runtime.native.<name> (or owner.<name>) so a test can count the calls that took that path."""

    def __init__(self, monkeypatch, name: str, owner=None):
        from llama_min.runtime import native

        owner = native if owner is None else owner
        self.calls, real = 0, getattr(owner, name)

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(owner, name, counted)


def python_without_torch(code: str, root: Path):
    """Run `code` in a fresh interpreter where `import torch` fails (what draws from saved files needs no torch)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          capture_output=True, text=True, cwd=root, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root), MPLBACKEND="Agg"))
