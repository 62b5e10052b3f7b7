"""Training: overfitting, exact resume, chat masks, export, LoRA merge, torchrun (gloo), bad inputs."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_min import ModelArgs, Transformer, load_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.train.data import PackedData, encode_chat, encode_records, read_records
from llama_min.train.lora import LoRALinear, apply_lora, merge_lora, merge_state_dict
from llama_min.train.loop import Trainer, lr_at
from llama_min.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train.py"
WORDS = ("the king queen castle night day love heart sword crown river light dark sweet fair old young "
         "speak hear see know thou thee thy my lord lady good ill war peace death life time world").split()
TINY_MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=64)


def make_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-prose: lines of 6-12 words."""
    rng = random.Random(seed)
    lines, n = [], 0
    while n < n_words:
        k = rng.randint(6, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 busy cores: OpenMP sync between 2 threads costs more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_inputs(d: Path, n_words: int) -> Path:
    """d/tiny.json (TINY_MODEL) and d/text.txt (n_words of make_text): what a tiny training run reads."""
    (d / "tiny.json").write_text(json.dumps(TINY_MODEL))
    (d / "text.txt").write_text(make_text(n_words))
    return d


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model config and a text file shared by the tests of this module."""
    return tiny_inputs(tmp_path_factory.mktemp("train"), 3000)


def cli(*args, env_extra=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_in_process(**kw) -> Trainer:
    trainer = Trainer(TrainConfig().updated(kw, "test"))
    trainer.fit()
    return trainer


# --------------------------------------------------------------------------------------- training works


def test_overfits_a_small_batch(workdir, tmp_path):
    """Two windows, many steps: the loss must fall close to zero."""
    (tmp_path / "small.txt").write_text(make_text(40, seed=3))
    t = run_in_process(config=str(workdir / "tiny.json"), data=[str(tmp_path / "small.txt")], out=str(tmp_path / "run"),
                       max_steps=80, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=5, val_fraction=0,
                       eval_every=0, sample_tokens=0, weight_decay=0.0)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    print(f"[overfit] loss {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert losses[0] > 5.0 and losses[-1] < 0.3
    assert t.data.n_train >= 1


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert abs(lr_at(14, cfg) - 0.1) < 1e-12


def test_resume_equals_uninterrupted(workdir, tmp_path):
    """--stop-after 3 then --resume logs exactly the losses of one uninterrupted run (CLI, subprocesses).

    The stopped run also gets the debris of a kill during the next save (a half-written temp checkpoint,
    metrics lines past the checkpoint, a cut-off line): resume must ignore it all.
    """
    common = ["--config", workdir / "tiny.json", "--data", workdir / "text.txt", "--max-steps", 7,
              "--batch-size", 4, "--grad-accum", 2, "--seq-len", 32, "--eval-every", 3, "--lr", 3e-3,
              "--warmup-steps", 2, "--sample-tokens", 4]
    full = cli(*common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    part = cli(*common, "--out", tmp_path / "part", "--stop-after", 3)
    assert part.returncode == 0, part.stderr
    assert not (tmp_path / "part" / "final").exists()
    run = tmp_path / "part"
    (run / "checkpoints" / ".tmp-step_00000005-x").mkdir()
    (run / "checkpoints" / ".tmp-step_00000005-x" / "model.safetensors").write_bytes(b"half")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0, "lr": 0.0}) + "\n" + '{"step": 5, "lo')
    resumed = cli(*common, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = metrics(tmp_path / "full"), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 8))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bit for bit
    assert [m.get("val_loss") for m in a] == [m.get("val_loss") for m in b]
    _, sd_a = load_checkpoint(tmp_path / "full" / "final")
    _, sd_b = load_checkpoint(run / "final")
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_lora_resume_with_dropout_is_exact(workdir, tmp_path):
    """LoRA with dropout draws random numbers every step: the saved RNG state makes resume exact."""
    base = run_in_process(config=str(workdir / "tiny.json"), data=[str(workdir / "text.txt")], out=str(tmp_path / "base"),
                          max_steps=2, batch_size=2, seq_len=32, sample_tokens=0, eval_every=0)
    assert base.tok_files == [tmp_path / "base" / "tokenizer.model"]
    kw = dict(init=str(tmp_path / "base" / "final"), data=[str(workdir / "text.txt")], max_steps=6, batch_size=2,
              seq_len=32, lora_rank=4, lora_dropout=0.2, lora_targets="wq,wv,w2", lr=1e-2, sample_tokens=0,
              eval_every=0)
    run_in_process(out=str(tmp_path / "full"), **kw)
    cfg = TrainConfig().updated(dict(kw, out=str(tmp_path / "part")), "test")
    assert Trainer(cfg).fit(stop_after=2) is None
    ckpt = next((tmp_path / "part" / "checkpoints").iterdir())
    assert all(".lora_" in k for k in json.loads((ckpt / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (ckpt / "model.safetensors").read_bytes()[:8], "little")]) if k != "__metadata__")
    Trainer(cfg, resume=True).fit()
    assert [m["loss"] for m in metrics(tmp_path / "full")] == [m["loss"] for m in metrics(tmp_path / "part")]
    args, sd = load_checkpoint(tmp_path / "part" / "final")
    assert not any("lora" in k for k in sd)


def test_export_loads_with_identical_logits(workdir, tmp_path):
    t = run_in_process(config=str(workdir / "tiny.json"), data=[str(workdir / "text.txt")], out=str(tmp_path / "run"),
                       max_steps=3, batch_size=2, seq_len=32, sample_tokens=0, eval_every=0)
    args, sd = load_checkpoint(tmp_path / "run" / "final")
    loaded = build_transformer(args, sd).eval()
    t.model.eval()
    x = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), t.model(x))
    from llama_min import Llama

    llama = Llama.build(tmp_path / "run" / "final", max_seq_len=64, device="cpu")
    assert isinstance(llama.text_completion(["the king"], max_gen_len=5)[0]["generation"], str)


# ----------------------------------------------------------------------------------------------- chat


def _bpe_tokenizer(tmp_path: Path, specials: list) -> Path:
    """A small byte-level BPE tokenizer.json (+ config) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([make_text(500)], trainer)
    d = tmp_path / specials[1].strip("<|>")
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    return d / "tokenizer.json"


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory, fixtures_dir):
    from llama_min.text.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    toks = {
        "llama2": load_tokenizer(fixtures_dir / "mistral-tokenizer.model.v1"),
        "chatml": load_tokenizer(_bpe_tokenizer(d, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"])),
        "llama3": load_tokenizer(_bpe_tokenizer(d, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                    "<|end_header_id|>", "<|eot_id|>"])),
    }
    for name, tok in toks.items():
        assert tok.chat_format == name
    return toks


DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is the king?"},
          {"role": "assistant", "content": "The old king."}, {"role": "user", "content": "And the queen?"},
          {"role": "assistant", "content": "The young queen."}]


@pytest.mark.parametrize("fmt", ["llama2", "chatml", "llama3"])
def test_chat_masks_all_but_assistant_tokens(chat_tokenizers, fmt):
    tok = chat_tokenizers[fmt]
    ids, mask = encode_chat(tok, DIALOG)
    assert len(ids) == len(mask)
    assert ids == tok.encode_dialog(DIALOG, open_assistant=False)  # the same tokens as the chat format
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "The old king." in learned and "The young queen." in learned
    assert "Who is the king" not in learned and "queen?" not in learned and "briefly" not in learned
    assert "Who is the king" in context and "Answer briefly." in context
    stop = tok.encode_followup([], open_assistant=False)  # the reply's closing tokens are learned
    assert ids[-len(stop):] == stop and all(mask[-len(stop):])
    print(f"[chat mask] {fmt}: {sum(mask)} of {len(ids)} tokens learned: {learned!r}")


def test_chat_jsonl_loss_only_on_assistant(chat_tokenizers, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": DIALOG}) + "\n\n" + json.dumps({"text": "the king speaks"}) + "\n")
    tok = chat_tokenizers["llama2"]
    ids, mask = encode_records(tok, read_records(path))
    chat_ids, chat_mask = encode_chat(tok, DIALOG)
    text_ids = tok.encode("the king speaks", bos=True, eos=True)
    assert ids.tolist() == chat_ids + text_ids
    assert mask.tolist() == [bool(m) for m in chat_mask] + [False] + [True] * (len(text_ids) - 1)
    data = PackedData.build(ids, mask, seq_len=8, val_fraction=0)
    x, y, m = data.window(0)
    assert torch.equal(x[1:], y[:-1]) and torch.equal(m, mask[1:9])


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_merged_equals_unmerged():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**dict(TINY_MODEL, tie_word_embeddings=True))).eval()
    n = apply_lora(model, rank=4, alpha=8, targets="wq,wk,wv,wo,w1,w2,w3")
    assert n == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.1)
    x = torch.randint(0, TINY_MODEL["vocab_size"], (2, 20))
    with torch.no_grad():
        unmerged = model(x)
        sd = merge_state_dict({k: v.clone() for k, v in model.state_dict().items()}, scale=8 / 4)
        from_sd = build_transformer(model.params, sd).eval()(x)
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-5 and (from_sd - unmerged).abs().max() < 1e-5
    print(f"[lora] merged vs unmerged max|dlogits| {(merged - unmerged).abs().max():.1e}")


def test_lora_starts_at_the_base_model():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_MODEL)).eval()
    x = torch.randint(0, TINY_MODEL["vocab_size"], (1, 10))
    with torch.no_grad():
        before = model(x)
        apply_lora(model, rank=2, alpha=4, dropout=0.0, targets="all")
        assert torch.equal(model(x), before)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("mode", ["ddp", pytest.param("ddp-ac", marks=pytest.mark.slow),
                                  pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one(workdir, tmp_path, mode):
    """torchrun --nproc_per_node 2 (gloo) with the same global batch logs the 1-process loss curve.

    FSDP2 is stopped after step 3 (just after an evaluation, which leaves the root module's parameters
    unsharded) and resumed: the checkpoint must still hold every parameter's AdamW state. The resumed
    part runs with --grad-checkpointing (FSDP2 composed with PyTorch's checkpoint, from a run folder saved
    without it); ddp-ac runs DDP with it throughout.
    """
    common = ["--config", workdir / "tiny.json", "--data", workdir / "text.txt", "--max-steps", 5,
              "--batch-size", 4, "--seq-len", 32, "--eval-every", 3, "--lr", 3e-3, "--sample-tokens", 0]
    one = cli(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    cmd = [*torchrun, *map(str, common), "--out", str(tmp_path / "two"),
           "--tokenizer", str(tmp_path / "one" / "tokenizer.model")]
    cmds = {"ddp": [cmd], "ddp-ac": [cmd + ["--grad-checkpointing"]],
            "fsdp": [cmd + ["--fsdp", "--stop-after", "3"],
                     [*torchrun, "--out", str(tmp_path / "two"), "--resume", "--grad-checkpointing"]]}[mode]
    for cmd in cmds:
        two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
        assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5 * a[-1]["val_loss"]
    print(f"[torchrun {mode}] max |dloss| = {max(abs(x['loss'] - y['loss']) for x, y in zip(a, b)):.1e}")
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- errors


def _bad_inputs(d: Path, workdir: Path) -> dict:
    (d / "empty.txt").write_text("  \n\n")
    (d / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n{"text": "x"}\n')
    (d / "fields.jsonl").write_text('{"text": "fine"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    data, cfg = ["--data", workdir / "text.txt"], ["--config", workdir / "tiny.json"]
    return {
        "empty": ([*cfg, "--data", d / "empty.txt"], "empty.txt: empty file"),
        "utf8": ([*cfg, "--data", d / "latin1.txt"], "latin1.txt:3: not valid UTF-8"),
        "jsonl": ([*cfg, "--data", d / "broken.jsonl"], "broken.jsonl:2: invalid JSON"),
        "fields": ([*cfg, "--data", d / "fields.jsonl"], "fields.jsonl:3: chat record has no assistant"),
        "missing": ([*cfg, "--data", d / "nope.txt"], "nope.txt: no such file"),
        "seq_len": ([*cfg, *data, "--seq-len", 65], "--seq-len 65 is larger than the model's max_seq_len 64"),
        "config": (["--config", d / "nope.json", *data], "nope.json: no such model config file"),
        "flag": ([*cfg, *data, "--max-steps", "ten"], "invalid int value: 'ten'"),
        "both": ([*cfg, "--init", d, *data], "not allowed with argument"),
        "lora": ([*cfg, *data, "--lora-rank", 2, "--lora-targets", "wq,foo"], "LoRA targets ['foo']"),
    }


@pytest.mark.parametrize("case", ["empty", "utf8", "jsonl", "fields", "missing", "seq_len", "config", "flag",
                                  "both", "lora"])
def test_user_errors_are_one_clear_line(workdir, tmp_path, capsys, case):
    from llama_min.cli import train as train_cli

    argv, expected = _bad_inputs(tmp_path, workdir)[case]
    out = tmp_path / "out"
    try:
        rc = train_cli.main([*map(str, argv), "--out", str(out), "--max-steps", "3"] if case != "flag"
                               else [*map(str, argv), "--out", str(out)])
    except SystemExit as e:  # argparse errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err.strip()
    print(f"[error {case}] rc={rc}: {err}")
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert not out.exists()  # nothing half-written


def test_user_error_in_a_subprocess_has_no_traceback(workdir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 1}\n')
    res = cli("--config", workdir / "tiny.json", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "o")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f'error: {tmp_path / "bad.jsonl"}:2: expected a JSON object with '
                                              '"text" (a string) or "messages" (a list)']
    assert not (tmp_path / "o").exists()


def test_existing_run_needs_resume(workdir, tmp_path):
    cfg = dict(config=str(workdir / "tiny.json"), data=[str(workdir / "text.txt")], out=str(tmp_path / "r"),
               max_steps=1, batch_size=2, seq_len=16, sample_tokens=0)
    run_in_process(**cfg)
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(TrainConfig().updated(cfg, "test"))
    shutil.rmtree(tmp_path / "r")


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,ffn,params_m", [
    ("llama2-7b", 11008, 6738), ("llama3-8b", 14336, 8030), ("llama3.2-1b", 8192, 1236), ("smollm2-135m", 1536, 135),
    ("tinyllama-1.1b", 5632, 1100), ("stories15M", 768, 15), ("stories110M", 2048, 110)])
def test_model_configs_have_the_real_shapes(name, ffn, params_m):
    from llama_min.checkpoint import expected_shapes
    from llama_min.train.config import read_json_file, resolve_model_config

    args = ModelArgs.from_dict(read_json_file(resolve_model_config(name), "model config"))
    shapes = expected_shapes(args)
    if args.tie_word_embeddings:
        shapes.pop("output.weight")
    n = sum(torch.Size(s).numel() for s in shapes.values())
    assert args.ffn_hidden == ffn and round(n / 1e6) == params_m, (args.ffn_hidden, n)


@pytest.mark.parametrize("name", ["train_scratch", "train_finetune", "train_lora"])
def test_training_configs_load(name):
    from llama_min.train.config import read_json_file, resolve_model_config

    cfg = TrainConfig().updated(read_json_file(resolve_model_config(name), "training config"), name)
    cfg.updated({"config": "tiny", "data": ["x.txt"], "out": "o"}, "test").check()


def _ac_steps(cfg: dict, n_steps: int = 3) -> dict:
    """Build a Trainer (nothing written) and run `n_steps` optimizer steps: the losses, the gradients the
    optimizer saw at each step, the block forwards counted per step (by forward pre-hooks, which fire for
    a checkpoint's recomputation too), and the forwards of one evaluation."""
    from llama_min.model import TransformerBlock

    t = Trainer(TrainConfig().updated(cfg, "test"))
    blocks = [m for m in t.model.modules() if isinstance(m, TransformerBlock)]
    calls = [0]
    for b in blocks:
        b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    grads = []
    t.opt.register_step_pre_hook(lambda opt, *_: grads.append(
        {n: p.grad.clone() for n, p in t.named}))
    losses, per_step = [], []
    for _ in range(n_steps):
        calls[0] = 0
        losses.append(t.train_step(lr_at(t.step, t.cfg)))
        per_step.append(calls[0])
    calls[0] = 0
    t.evaluate()
    return dict(trainer=t, blocks=blocks, losses=torch.tensor(losses), grads=grads, per_step=per_step,
                eval_calls=calls[0], keys=list(t.model.state_dict()), names=[n for n, _ in t.named])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_grad_checkpointing_is_pytorchs_and_changes_nothing(workdir, tmp_path, kind):
    """--grad-checkpointing recomputes each block in backward (PyTorch's composable `checkpoint`: hooks,
    no patched `forward`) and changes neither the numbers nor the parameter names.

    LoRA runs with dropout, so the recomputation must replay the RNG of the first forward.
    """
    from llama_min.model import TransformerBlock

    (tmp_path / "text.txt").write_text(make_text(800))
    cfg = dict(config=str(workdir / "tiny.json"), data=[str(tmp_path / "text.txt")], batch_size=2, seq_len=32,
               grad_accum=2, max_steps=3, eval_batches=1, sample_tokens=0, out=str(tmp_path / "never-written"))
    if kind == "lora":
        cfg.update(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1, lora_targets="all")
    off = _ac_steps(cfg)
    on = _ac_steps(dict(cfg, grad_checkpointing=True))
    assert not (tmp_path / "never-written").exists()

    assert on["keys"] == off["keys"] and on["names"] == off["names"]  # run folders of either kind resume
    for b in on["blocks"]:  # the module is untouched: its class's forward, nothing set on the instance
        assert "forward" not in vars(b) and type(b) is TransformerBlock
    n_blocks, n_micro = len(on["blocks"]), cfg["grad_accum"]
    assert off["per_step"] == [n_blocks * n_micro] * 3          # one forward per block and micro-step
    assert on["per_step"] == [2 * n_blocks * n_micro] * 3       # ... and its recomputation in backward
    assert on["eval_calls"] == off["eval_calls"] > 0            # no autograd: nothing to recompute

    torch.testing.assert_close(on["losses"], off["losses"])
    dloss = (on["losses"] - off["losses"]).abs().max().item()
    dgrad = 0.0
    for g_on, g_off in zip(on["grads"], off["grads"], strict=True):
        assert g_on.keys() == g_off.keys()
        for name in g_on:
            torch.testing.assert_close(g_on[name], g_off[name], msg=name)
            dgrad = max(dgrad, (g_on[name] - g_off[name]).abs().max().item())
    print(f"[grad checkpointing {kind}] forwards per step {off['per_step'][0]} -> {on['per_step'][0]}, "
          f"max |dloss| {dloss:.1e}, max |dgrad| {dgrad:.1e}")


def test_grad_checkpointing_gives_the_same_losses(workdir, tmp_path):
    """Whole runs: checkpointing on from the start, or switched on when resuming a run saved without it."""
    kw = dict(config=str(workdir / "tiny.json"), data=[str(workdir / "text.txt")], max_steps=3, batch_size=2,
              seq_len=32, sample_tokens=0, eval_every=0)
    run_in_process(out=str(tmp_path / "a"), **kw)
    kw["tokenizer"] = str(tmp_path / "a" / "tokenizer.model")
    run_in_process(out=str(tmp_path / "b"), grad_checkpointing=True, **kw)
    Trainer(TrainConfig().updated(dict(kw, out=str(tmp_path / "c")), "test")).fit(stop_after=1)
    Trainer(TrainConfig().updated(dict(kw, out=str(tmp_path / "c"), grad_checkpointing=True), "test"),
            resume=True).fit()
    losses = [torch.tensor([m["loss"] for m in metrics(tmp_path / r)]) for r in "abc"]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


def test_tied_embeddings_stay_tied(workdir, tmp_path):
    """A tied config trains one matrix for input and output, and final/ holds exactly what was trained."""
    (tmp_path / "tied.json").write_text(json.dumps(dict(TINY_MODEL, tie_word_embeddings=True)))
    t = run_in_process(config=str(tmp_path / "tied.json"), data=[str(workdir / "text.txt")], out=str(tmp_path / "r"),
                       max_steps=2, batch_size=2, seq_len=32, sample_tokens=0, eval_every=0)
    assert t.model.output.weight is t.model.tok_embeddings.weight
    args, sd = load_checkpoint(tmp_path / "r" / "final")
    x = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(build_transformer(args, sd).eval()(x), t.model.eval()(x))


def test_help_explains_every_flag(capsys):
    from llama_min.cli import train as train_cli

    assert train_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--init", "--tokenizer", "--data", "--out", "--train-config", "--max-steps",
                 "--batch-size", "--seq-len", "--lr", "--seed", "--save-every", "--stop-after", "--resume",
                 "--lora-rank", "--fsdp", "--bf16", "--grad-checkpointing", "--overwrite"):
        assert flag in out
