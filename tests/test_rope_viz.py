"""llama_min/inspect/rope_viz.py (and its wrapper scripts/rope_viz.py): the data behind the RoPE pictures (no
matplotlib needed) and the pictures themselves."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_min.inspect import rope_viz as rv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rope_viz.py"



def test_rope_logit_is_the_same_at_every_absolute_position():
    for offset in (1, 8, 100):
        d = rv.relative_scores(offset=offset, n_pos=1024)
        rope, sin = d["rope"], d["sinusoidal"]
        assert (rope.max() - rope.min()).item() < 1e-4, "RoPE logit must depend on the distance only"
        assert (sin.max() - sin.min()).item() > 1.0, "added sinusoidal embeddings should depend on m"
    # the RoPE logit does change with the distance itself
    assert abs(rv.relative_scores(offset=1)["rope"][0] - rv.relative_scores(offset=8)["rope"][0]) > 1e-2


def test_sinusoidal_embedding_is_the_original_transformer_one():
    freqs = rv.thetas(10000.0, 16)
    pe = rv.sinusoidal_embedding(torch.arange(5), freqs)
    m, i = 3, 2
    assert math.isclose(pe[m, 2 * i].item(), math.sin(m / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(pe[m, 2 * i + 1].item(), math.cos(m / 10000 ** (2 * i / 16)), abs_tol=1e-6)


def test_rotation_data_is_unit_and_turns_by_m_theta():
    data, theta = rv.rotation_data(pairs=(0, 16, 32), n_pos=16), rv.thetas()
    for i, z in data.items():
        torch.testing.assert_close(z.abs(), torch.ones(16), atol=1e-6, rtol=0)
        expected = torch.polar(torch.ones(16), torch.arange(16) * theta[i])
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=0)


def test_angle_table_fast_and_slow_pairs():
    table = rv.angle_table(256)
    assert table.shape == (256, rv.HD // 2)
    assert table[:, 0].min() < -0.99  # pair 0 goes all the way round
    assert table[:, -1].min() > 0.99  # the last pair barely moves in 256 tokens


def test_decay_bound_starts_at_mean_j_and_decays():
    for base in (10000.0, 500000.0):
        bound = rv.decay_bound(4096, base)
        assert math.isclose(bound[0].item(), (rv.HD // 2 + 1) / 2, rel_tol=1e-5)  # S_j = j at distance 0
        assert bound[1000:2000].mean() < 0.6 * bound[10:20].mean()
    assert rv.decay_bound(4096, 500000.0)[100:1000].mean() > rv.decay_bound(4096, 10000.0)[100:1000].mean()


def test_scaling_bands():
    d = rv.scaling_data()
    wavelen = 2 * math.pi / d["theta"]
    keep, slow = wavelen < d["keep_below"], wavelen > d["scale_above"]
    for factor, scaled in d["scaled"].items():
        torch.testing.assert_close(scaled[keep], d["theta"][keep])
        torch.testing.assert_close(scaled[slow], d["theta"][slow] / factor)


def test_qk_row_order():
    order = rv.qk_row_order(8)
    assert order["hf_holds_meta"] == [0, 2, 4, 6, 1, 3, 5, 7]  # HF row j*hd/2 + i = Meta row 2i + j
    assert order["meta_holds_hf"] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_pictures_are_written_headless(tmp_path):
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's llama_min, whatever is installed
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for file_name, _, _ in rv.PICTURES.values():
        data = (tmp_path / file_name).read_bytes()
        assert data.startswith(b"\x89PNG") and 10_000 < len(data) < 200_000, (file_name, len(data))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_only(tmp_path):
    pytest.importorskip("matplotlib")
    assert rv.main(["--out", str(tmp_path), "--only", "qk_order"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["rope_qk_order.png"]


def test_script_default_out_is_scripts_img():
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and str(ROOT / "scripts" / "img") in " ".join(run.stdout.split())


def test_out_is_required_without_a_default(capsys):
    with pytest.raises(SystemExit) as exc:
        rv.main(["--only", "decay"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_missing_matplotlib_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert rv.main(["--out", str(tmp_path / "x")]) == 2
    assert "pip install 'llama_min[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
