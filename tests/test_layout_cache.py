"""The converted layouts of a packed GGUF load, cached on disk (runtime/layout_cache.py).

What must hold: a second load maps what the first one wrote (no conversion runs, the same logits bit for bit);
a changed GGUF file is never served from a stale layout (the model is the new file's, as a load with the cache
off builds it); a damaged layout, an unwritable cache folder or the off switches never break a load; the file
is plain safetensors. The whole test session runs with the cache off (conftest.py); these tests turn it on
with the cache folder in tmp_path.
"""

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import CallCounter, use_int4_kernel
from llama_min.runtime import layout_cache, native
from llama_min.runtime import packed
from test_gguf_packed import write_tiny

# what each type's conversion calls (the C functions that make the layout)
CONVERSIONS = {Q.Q4_0: "q4x8_repack", Q.Q4_1: "q4x8_repack", Q.Q4_K: "q4kx8_repack", Q.Q6_K: "q6kx8_repack",
               Q.Q8_0: "q8x8_repack"}
TOKENS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8]])


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """The layout cache on, its folder under tmp_path/cache; the C kernels required."""
    use_int4_kernel(monkeypatch, "avx2")
    monkeypatch.setenv("LLAMA_MIN_LAYOUT_CACHE", "1")
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "layouts"


def load_gguf_packed(path, **kw):
    """The loader, then a wait for the layout it writes in the background (layout_cache.wait_for_writes)."""
    model = packed.load_gguf_packed(path, **kw)
    layout_cache.wait_for_writes()
    return model


def conversion_of(qtype) -> str:
    if qtype == Q.Q4_K and not native.vnni():
        return "q4k_to_avx2"  # without AVX-512 VNNI Q4_K goes to the 'avx2' 4-bit layout, not tiles
    if qtype == Q.Q6_K and not native.vnni():
        return "q6k_to_int8"
    return CONVERSIONS[qtype]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS, 0)


def built_without_cache(path, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("LLAMA_MIN_LAYOUT_CACHE", "0")
    out = logits(load_gguf_packed(path))
    monkeypatch.setenv("LLAMA_MIN_LAYOUT_CACHE", "1")
    return out


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_second_load_maps_the_layout_the_first_one_wrote(tmp_path, cache_on, monkeypatch, qtype):
    if qtype == Q.Q8_0 and not native.vnni():
        pytest.skip("Q8_0 is held as stored (nothing converted) without AVX-512 VNNI")
    path = write_tiny(tmp_path / "m.gguf", qtype)
    first = logits(load_gguf_packed(path))
    files = list(cache_on.glob("*.safetensors"))
    assert files == [layout_cache.layout_path(path)]
    calls = CallCounter(monkeypatch, conversion_of(qtype))
    second = load_gguf_packed(path)
    assert calls.calls == 0, "the second load converted again instead of mapping the layout"
    torch.testing.assert_close(logits(second), first, rtol=0, atol=0)
    torch.testing.assert_close(first, built_without_cache(path, monkeypatch), rtol=0, atol=0)


def test_the_layout_is_a_safetensors_file_of_the_models_tensors(tmp_path, cache_on):
    from safetensors import safe_open

    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    model = load_gguf_packed(path)
    layer = model.layers[0].attention.wq
    held = next(b for b in layer.buffers())
    with safe_open(str(layout_cache.layout_path(path)), framework="pt") as f:
        meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["source"] == str(path.resolve()) and meta["version"] == str(layout_cache.LAYOUT_VERSION)
    name = next(k for k in saved if k.startswith("blk.0.attn_q.weight@"))
    assert torch.equal(saved[name], held)


def test_a_changed_file_is_never_served_a_stale_layout(tmp_path, cache_on, monkeypatch):
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0, seed=0)
    old = logits(load_gguf_packed(path))
    write_tiny(path, Q.Q4_0, seed=1)  # the same shapes, other weights: a re-download of another version
    new = logits(load_gguf_packed(path))
    assert not torch.allclose(new, old)
    torch.testing.assert_close(new, built_without_cache(path, monkeypatch), rtol=0, atol=0)


def test_a_change_in_place_with_the_old_mtime_is_still_noticed(tmp_path, cache_on, monkeypatch):
    """The key hashes the first and last bytes of every tensor, so an edit there is seen even when the
    modification time is put back to the nanosecond."""
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    old = logits(load_gguf_packed(path))
    stat = path.stat()
    from llama_min.runtime.packed import model_header

    _, infos = model_header(path)
    offset = next(off for name, _, _, off in infos if name == "blk.1.ffn_down.weight")
    with open(path, "r+b") as f:  # blocks 0-1 of the first row: new codes (bytes 2-17, 20-35), scales kept
        f.seek(offset + 2)
        f.write(bytes(range(16)))
        f.seek(offset + 20)
        f.write(bytes(range(100, 116)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    new = logits(load_gguf_packed(path))
    assert not torch.equal(new, old)
    torch.testing.assert_close(new, built_without_cache(path, monkeypatch), rtol=0, atol=0)


def test_parts_of_a_layout_the_load_does_not_use_are_never_read_in(tmp_path, cache_on):
    """A layout may hold conversions this load does not ask for (made by an older llama_min, or on another CPU):
    only the parts the model uses are read into memory (a whole-file read doubled the 8B Q4_K_M file's first
    peak after the Q4_K tiles changed, 5.6 -> 9.2 GB), and the rewritten layout drops the rest."""
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    load_gguf_packed(path)
    layout = layout_cache.layout_path(path)
    cache = layout_cache.LayoutCache(path, {})
    meta = layout_cache.read_header(layout.read_bytes())[0]["__metadata__"]
    stale = {"blk.0.attn_q.weight@an older conversion": {"tiles": torch.randint(0, 255, (48 << 20,), dtype=torch.uint8)}}
    used = {k: {part: t.clone() for part, t in parts.items()} for k, parts in cache.found.items()}
    del cache  # (its mapping of the file about to be rewritten)
    layout_cache.write_layout(layout, {**used, **stale}, meta)

    model = load_gguf_packed(path)
    resident = 0  # kB of the layout file's mapping in this process
    mapped = False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            mapped = str(layout) in line  # (" (deleted)" after the rewrite)
        elif mapped and line.startswith("Rss:"):
            resident += int(line.split()[1])
    assert 0 < resident * 1024 < 8 << 20, resident
    assert torch.isfinite(logits(model)).all()
    assert "an older conversion" not in layout.read_bytes()[:4096].decode("latin-1")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_layout_is_rebuilt(tmp_path, cache_on, monkeypatch, damage):
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    good = logits(load_gguf_packed(path))
    layout = layout_cache.layout_path(path)
    data = layout.read_bytes()
    layout.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    torch.testing.assert_close(logits(load_gguf_packed(path)), good, rtol=0, atol=0)
    assert layout.read_bytes() == data  # written whole again


def test_off_switches_write_nothing(tmp_path, cache_on, monkeypatch):
    from llama_min.cli.generate import build_parser

    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    load_gguf_packed(path, layout_cache=False)
    monkeypatch.setenv("LLAMA_MIN_LAYOUT_CACHE", "0")
    load_gguf_packed(path)
    assert not cache_on.exists()
    assert build_parser().parse_args(["--no-layout-cache"]).layout_cache is False
    assert build_parser().parse_args([]).layout_cache is True


def test_an_unwritable_cache_folder_costs_one_warning_not_the_load(tmp_path, cache_on, capsys):
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    cache_on.parent.mkdir(parents=True)
    cache_on.write_text("a file where the folder should be")
    model = load_gguf_packed(path)
    err = capsys.readouterr().err
    assert "could not cache the converted layout" in err and len(err.strip().splitlines()) == 1
    assert torch.isfinite(logits(model)).all()


def test_layouts_of_deleted_files_are_pruned_when_a_layout_is_written(tmp_path, cache_on):
    gone, kept = write_tiny(tmp_path / "gone.gguf", Q.Q4_0), write_tiny(tmp_path / "kept.gguf", Q.Q4_1)
    load_gguf_packed(gone)
    assert layout_cache.layout_path(gone).exists()
    gone.unlink()
    old_tmp, new_tmp = cache_on / ".tmp-killed-writer.tmp", cache_on / ".tmp-writing-now.tmp"
    old_tmp.write_bytes(b"x"), new_tmp.write_bytes(b"x")
    os.utime(old_tmp, (1, 1))
    load_gguf_packed(kept)
    assert not layout_cache.layout_path(gone).exists() and layout_cache.layout_path(kept).exists()
    assert not old_tmp.exists() and new_tmp.exists()  # a temp file over an hour old is a killed writer's


def test_a_cancelled_write_leaves_neither_a_layout_nor_a_temp_file(tmp_path, cache_on, monkeypatch):
    """What a Ctrl-C does to a layout still being written (cli/common.py run_main: cancel_writes)."""
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    monkeypatch.setattr(layout_cache, "CANCEL", __import__("threading").Event())
    layout_cache.CANCEL.set()
    model = load_gguf_packed(path)
    assert list(cache_on.iterdir()) == []
    assert torch.isfinite(logits(model)).all()
    layout_cache.CANCEL.clear()
    load_gguf_packed(path)
    assert [p.name for p in cache_on.iterdir()] == [layout_cache.layout_path(path).name]


def test_the_command_line_says_it_finishes_the_layout_and_does(tmp_path, cache_on, monkeypatch, capsys):
    """At the end of a command, a layout still being written is waited for, with one line saying why
    (cli/common.py run_main calls finish_layout_writes)."""
    import threading

    from llama_min.cli.common import finish_layout_writes

    go, real = threading.Event(), layout_cache.write_layout

    def held_write(*args):  # the writer waits until the command has asked whether it is still writing
        go.wait(30)
        real(*args)

    monkeypatch.setattr(layout_cache, "write_layout", held_write)
    path = write_tiny(tmp_path / "m.gguf", Q.Q4_0)
    packed.load_gguf_packed(path)  # no wait here
    threading.Timer(0.2, go.set).start()
    finish_layout_writes(quiet=False)
    err = capsys.readouterr().err
    assert err.startswith("caching the converted layout (") and len(err.strip().splitlines()) == 1
    assert layout_cache.layout_path(path).exists() and not layout_cache.writing()


def test_a_layout_holds_only_what_the_load_used(tmp_path, cache_on, monkeypatch):
    """A layout written under another conversion (here: Q6_K as int8 rows, without VNNI, then tiled with it) is
    rewritten without the parts no longer used (a layout's parts are read in as they are used, but the file would
    keep growing)."""
    if not native.vnni():
        pytest.skip("needs AVX-512 VNNI to load Q6_K two ways")
    path = write_tiny(tmp_path / "m.gguf", Q.Q6_K)
    monkeypatch.setenv("LLAMA_MIN_VNNI", "0")
    load_gguf_packed(path)
    monkeypatch.setenv("LLAMA_MIN_VNNI", "1")
    model = load_gguf_packed(path)
    from safetensors import safe_open

    with safe_open(str(layout_cache.layout_path(path)), framework="pt") as f:
        names = list(f.keys())
    assert names and all("@tiles Q6_K/" in n for n in names if n.startswith("blk.")), names
    calls = CallCounter(monkeypatch, "q6kx8_repack")
    torch.testing.assert_close(logits(load_gguf_packed(path)), logits(model), rtol=0, atol=0)
    assert calls.calls == 0
