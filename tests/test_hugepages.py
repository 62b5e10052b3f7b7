"""use_huge_pages moves large CPU weights onto 2 MB-aligned memory advised for huge pages, bit for bit."""

import pytest
import torch

from _tiny import tiny_model
from llama_min.runtime import hugepages

pytestmark = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def _vm_flags(ptr: int) -> list:
    """The VmFlags of the mapping holding address ptr (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_large_weights_move_small_ones_stay(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 64 * 160 * 4)  # the tiny model's FFN matrices count as large
    m = tiny_model(scale=0.2, max_seq_len=64, tie_word_embeddings=True)
    before = {name: t.clone() for name, t in m.state_dict().items()}
    ptrs = {name: t.data_ptr() for name, t in m.state_dict().items()}
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = m(tokens)
        hugepages.use_huge_pages(m)
        got = m(tokens)
    assert torch.equal(got, want)
    after = m.state_dict()
    for name, t in after.items():
        assert torch.equal(t, before[name]), name
    w1 = m.layers[0].feed_forward.w1.weight
    assert isinstance(w1, torch.nn.Parameter) and w1.data_ptr() != ptrs["layers.0.feed_forward.w1.weight"]
    assert w1.data_ptr() % hugepages.HUGE_PAGE == 0
    assert m.layers[0].attention.wk.weight.data_ptr() == ptrs["layers.0.attention.wk.weight"]  # 64 x 32: small
    assert m.output.weight is m.tok_embeddings.weight  # still tied


def test_weights_in_a_mapped_file_stay(tmp_path):
    """A tensor that reads a memory-mapped file is left there: copying it would hold it twice."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.randn(1024, 1024)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        w = f.get_tensor("w")
    lin = torch.nn.Linear(1024, 1024, bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    anon = torch.nn.Linear(1024, 1024, bias=False).requires_grad_(False)
    model = torch.nn.Sequential(lin, anon)
    ptr, anon_ptr = w.data_ptr(), anon.weight.data_ptr()
    hugepages.use_huge_pages(model)
    assert lin.weight.data_ptr() == ptr and anon.weight.data_ptr() != anon_ptr


def test_huge_page_copy_of_odd_sizes():
    for shape, dtype in (((3, 5), torch.float32), (((1 << 20) + 3,), torch.int8), (((1 << 21) + 7,), torch.uint8)):
        t = torch.randint(-100, 100, shape).to(dtype)
        c = hugepages.huge_page_copy(t)
        assert torch.equal(c, t) and c.data_ptr() % hugepages.HUGE_PAGE == 0 and c.is_contiguous()
        # advised for huge pages exactly when it holds a whole 2 MB stretch
        assert ("hg" in _vm_flags(c.data_ptr())) == (t.numel() * t.element_size() >= hugepages.HUGE_PAGE)


def test_onednn_weights_stay():
    """A weight in oneDNN's opaque layout (linear.use_onednn_linears, the float32 path of CPUs where
    llama_min's own kernel is not used) has no data pointer: it is left alone, the plain ones move."""
    from llama_min.runtime.linear import OneDNNLinear, onednn_available, use_onednn_linears

    if not onednn_available():
        pytest.skip("no oneDNN in this PyTorch build")
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.LayerNorm(1024 * 512))
    model = use_onednn_linears(model.requires_grad_(False))
    assert isinstance(model[0], OneDNNLinear)
    x = torch.randn(3, 1024)
    want = model[0](x)
    hugepages.use_huge_pages(model)
    assert torch.equal(model[0](x), want)
    assert model[1].weight.data_ptr() % hugepages.HUGE_PAGE == 0  # 2 MB of plain weight: moved
