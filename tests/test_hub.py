"""Hub ids and the Hugging Face cache: a fake cache layout (blobs + snapshots/<hash> links + refs) holding a
tiny model; any network use fails the test."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _tiny import random_hf_model
from llama_min import Llama, load_checkpoint, load_tokenizer
from llama_min.errors import EnvironmentFailure, LlamaMinError
from llama_min.files.hub import DOWNLOAD_PATTERNS, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every socket connect fails the test; HF_HUB_CACHE points into tmp_path; online mode."""
    def refuse(*a, **k):
        pytest.fail("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, fixtures_dir):
    """A tiny HF-format model (transformers' own save_pretrained) + a sentencepiece tokenizer.model."""
    folder = tmp_path_factory.mktemp("src")
    random_hf_model("tied", vocab_size=32000).save_pretrained(folder)
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", folder / "tokenizer.model")
    return folder


def put_in_cache(cache: Path, repo_id: str, src: Path, commit=COMMIT, refs=("main",), names=None) -> Path:
    """huggingface_hub's layout: blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if names is not None and f.name not in names:
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return repo


def cache_dir() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def same_weights(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_hub_id_loads_from_cache_without_network(model_files):
    put_in_cache(cache_dir(), "tiny-org/tiny-llama", model_files)
    assert resolve_checkpoint("tiny-org/tiny-llama") == cache_dir() / "models--tiny-org--tiny-llama/snapshots" / COMMIT
    assert same_weights(load_checkpoint("tiny-org/tiny-llama"), load_checkpoint(model_files))
    assert load_tokenizer("tiny-org/tiny-llama").encode("Hello world") == [22557, 1526]
    llama = Llama.build("tiny-org/tiny-llama", max_seq_len=32, max_batch_size=1, device="cpu", dtype=torch.float32)
    assert llama.tokenizer.encode("Hello world") == [22557, 1526]
    with torch.no_grad():
        assert llama.model(torch.tensor([[1, 22557, 1526]])).shape == (1, 3, 32000)


def test_revisions_and_cache_folders(model_files, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_files, other)
    random_hf_model("tied", seed=5, vocab_size=32000).save_pretrained(other)
    repo = put_in_cache(cache_dir(), "org/m", other, commit=OLD_COMMIT, refs=("v1.0",))
    put_in_cache(cache_dir(), "org/m", model_files)
    new, old = load_checkpoint(model_files), load_checkpoint(other)
    assert same_weights(load_checkpoint("org/m"), new)
    assert same_weights(load_checkpoint("org/m@v1.0"), old)            # a tag in refs/
    assert same_weights(load_checkpoint(f"org/m@{OLD_COMMIT}"), old)   # a commit hash
    assert same_weights(load_checkpoint(repo), new)                     # models--org--m: refs/main
    shutil.rmtree(repo / "refs")
    os.utime(repo / "snapshots" / OLD_COMMIT, (2e9, 2e9))               # newest snapshot when no refs
    assert same_weights(load_checkpoint(str(repo)), old)


def test_existing_local_path_wins_over_hub_id(model_files, tmp_path, monkeypatch):
    put_in_cache(cache_dir(), "org/m", model_files)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    random_hf_model("tied", seed=9, vocab_size=32000).save_pretrained(tmp_path / "org" / "m")
    assert resolve_checkpoint("org/m") == Path("org/m")
    assert not same_weights(load_checkpoint("org/m"), load_checkpoint(model_files))


def test_offline_missing_model_is_one_line(monkeypatch, model_files):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_in_cache(cache_dir(), "org/partial", model_files, names={"config.json"})  # no weights: incomplete
    for name in ("org/absent", "org/partial"):
        with pytest.raises(LlamaMinError, match=r"not in the Hugging Face cache .* HF_HUB_OFFLINE") as e:
            load_checkpoint(name)
        assert "\n" not in str(e.value)


def hub_error(cls, message):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.response, err.request, err.server_message, err.request_id = SimpleNamespace(headers={}), None, None, None
    return err


def test_download_asks_for_weights_config_and_tokenizer_only(monkeypatch, model_files):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append(dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns))
        return str(put_in_cache(Path(cache_dir), repo_id, model_files) / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert same_weights(load_checkpoint("org/fresh"), load_checkpoint(model_files))
    assert calls == [dict(repo_id="org/fresh", revision=None, cache_dir=cache_dir(), allow_patterns=DOWNLOAD_PATTERNS)]
    load_checkpoint("org/fresh")                                   # now cached: no second download
    assert len(calls) == 1
    import fnmatch

    wanted = [n for n in ("model.safetensors", "model-00001-of-00002.safetensors", "config.json",
                          "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")]
    unwanted = ["pytorch_model.bin", "consolidated.00.pth", "model.gguf", "original/consolidated.00.pth", "README.md"]
    assert all(any(fnmatch.fnmatch(n, p) for p in DOWNLOAD_PATTERNS) for n in wanted)
    assert not any(fnmatch.fnmatch(n, p) for n in unwanted for p in DOWNLOAD_PATTERNS)


@pytest.mark.parametrize("cls, expect, kind", [
    ("GatedRepoError", r"a gated model: log in .* accepted its licence at https://huggingface.co/meta-llama/x",
     LlamaMinError),
    ("RepositoryNotFoundError", r"no model 'meta-llama/x' on the Hugging Face hub", LlamaMinError),
    ("RevisionNotFoundError", r"has no revision", LlamaMinError),
    ("LocalEntryNotFoundError", r"download from the Hugging Face hub failed", EnvironmentFailure),
])
def test_hub_failures_are_one_line(monkeypatch, cls, expect, kind):
    import huggingface_hub
    from huggingface_hub import utils

    def fake_download(*a, **k):
        exc = getattr(utils, cls)
        raise exc("connection refused\nmore") if cls == "LocalEntryNotFoundError" else hub_error(exc, "404\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(kind, match=expect) as e:
        load_checkpoint("meta-llama/x@main" if cls == "RevisionNotFoundError" else "meta-llama/x")
    assert "\n" not in str(e.value)


def test_without_huggingface_hub_the_error_says_how_to_install(monkeypatch, model_files):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(LlamaMinError, match=r"install huggingface_hub \(pip install 'llama_min\[hub\]'\)"):
        load_checkpoint("org/not-cached")
    put_in_cache(cache_dir(), "org/cached", model_files)       # the cache itself needs no package
    assert same_weights(load_checkpoint("org/cached"), load_checkpoint(model_files))


def test_generate_script_runs_offline_on_a_hub_id(model_files, tmp_path):
    put_in_cache(cache_dir(), "org/tiny", model_files)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "Hello", "--max-new-tokens", "3",
           "--temperature", "0"]
    r = subprocess.run(cmd + ["--ckpt", "org/tiny"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["--ckpt", "org/unknown"], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: org/unknown: no such local path")
