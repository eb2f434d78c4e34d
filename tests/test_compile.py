"""The compiled training step (issue 22): ``torch.compile(fullgraph=True)`` of forward + backward on the
padded-SDPA path, static caption shapes, ``bus train --compile`` (resume, 2-rank DDP) and its errors.

CPU only: the backend is ``aot_eager`` (AOTAutograd traces forward and backward, eager ops run them), which
builds in seconds; inductor's generated kernels are a GPU matter (``bus bench train --gpu-suite``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bus_model import BusModel, create_model, get_config
from bus_model.data import Collator, SyntheticDataset
from bus_model.data.tokenizer import build_synthetic_tokenizer, text_config_overrides
from bus_model.training import checkpoint as ckpt
from bus_model.training import cli
from bus_model.training.compile import check_compile_config, check_compile_mode, compile_model, count_graph_breaks
from bus_model.training.distributed import parameter_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "bus-tiny", "--data", "synthetic", "--num-threads", "1", "--no-progress"]
COMPILED = ["--compile", "default", "--compile-backend", "aot_eager"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles new model objects: start from an empty dynamo cache (no recompile limits)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_and_batches(name="bus-tiny", batch_size=4, pad_to_max_length=True, **overrides):
    tokenizer = build_synthetic_tokenizer(model_max_length=get_config(name).max_text_len)
    torch.manual_seed(0)
    model = create_model(name, text=text_config_overrides(tokenizer), **overrides).train()
    v = model.config.vision
    data = SyntheticDataset(64, seed=0, image_size=v.image_size, patch_size=v.patch_size)
    collate = Collator(tokenizer, image_size=v.image_size, patch_size=v.patch_size, max_length=model.config.max_text_len,
                       pad_to_max_length=pad_to_max_length)

    def batch(i):
        b = collate([data[j] for j in range(i * batch_size, (i + 1) * batch_size)])
        return b["images"], b["input_ids"], b["attention_mask"], b["patch_labels"]

    return model, batch


def _loss_and_grads(model, batch, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(*batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in out.losses.items()}, grads


@pytest.mark.parametrize("name", ["bus-tiny", "bus-tiny-baseline"])
def test_compiled_forward_and_backward_match_eager(name):
    """Same weights, batch and RNG state: the aot_eager graph draws the same MLM masks, ITM negatives and
    PrefixLM splits as eager and gives the same loss terms and gradients."""
    model, batch = _model_and_batches(name)
    b = batch(0)
    loss, terms, grads = _loss_and_grads(model, b, seed=3)
    compile_model(model, "default", "aot_eager")
    loss_c, terms_c, grads_c = _loss_and_grads(model, b, seed=3)
    assert terms_c.keys() == terms.keys() and len(terms) >= 4
    for key in terms:
        torch.testing.assert_close(terms_c[key], terms[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and len(grads) > 10
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-4, atol=1e-5, msg=key)


def test_other_caption_lengths_do_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    model, batch = _model_and_batches(batch_size=2)
    batches = [batch(i) for i in range(6)]
    lengths = {int(b[2].sum(1).max()) for b in batches}
    assert len(lengths) > 1, "the test needs batches whose longest captions differ"
    assert {b[1].shape[1] for b in batches} == {model.config.max_text_len}  # padded to max_text_len
    _, unpadded = _model_and_batches(batch_size=2, pad_to_max_length=False)
    assert len({unpadded(i)[1].shape[1] for i in range(6)}) > 1  # without the option each length is a new shape
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for b in batches:
        compiled(*b).loss.backward()
    assert counter.frame_count == 1  # one graph, compiled once, for every batch


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bus-small", "bus-small-baseline"])
def test_no_graph_breaks_in_the_training_forward(name):
    """torch._dynamo.explain over bus-small's training forward (sdpa, every loss): one graph, 0 breaks."""
    torch.manual_seed(0)
    model = create_model(name).train()
    cfg = model.config
    B, L, S = 2, cfg.max_text_len, cfg.vision.image_size
    ids = torch.randint(4, cfg.text.vocab_size, (B, L))
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L // 2:] = 0
    graphs, breaks, reasons = count_graph_breaks(model, torch.randn(B, 3, S, S), ids, mask,
                                                 torch.rand(B, model.vision.num_patches))
    assert (graphs, breaks) == (1, 0), reasons


def test_padding_masks_are_cached_in_eager_only():
    """packing.memo caches a mask per tensor object in eager (the varlen path relies on it) and is
    bypassed inside a traced graph (it would break the graph on ``mask._version``)."""
    from bus_model.packing import memo

    mask = torch.ones(2, 5, dtype=torch.long)
    first = memo(mask, "test_bool", mask.bool)
    assert memo(mask, "test_bool", mask.bool) is first  # eager: cached
    mask.add_(0)  # an in-place change invalidates the entry
    assert memo(mask, "test_bool", mask.bool) is not first

    calls = []

    def traced(m):
        return memo(m, "test_traced", lambda: calls.append(1) or m.bool()).sum()

    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    assert int(compiled(mask)) == 10
    assert calls  # traced: make() ran inside the graph


def test_compile_errors_name_the_flag():
    with pytest.raises(ValueError, match="--compile: unknown mode 'fast'"):
        check_compile_mode("fast")
    with pytest.raises(ValueError, match="--compile-backend: unknown backend"):
        check_compile_mode("default", "tvm")
    with pytest.raises(ValueError, match="needs --compile-backend inductor"):
        check_compile_mode("reduce-overhead", "aot_eager")
    mass = get_config("bus-tiny", selection={"keep_mode": "mass"})
    with pytest.raises(ValueError, match='keep_mode="mass".*supports keep_mode="ratio"'):
        check_compile_config(mass, "default")
    check_compile_config(mass, "none")  # eager takes it
    with pytest.raises(ValueError, match='attn_impl="varlen".*supports attn_impl="sdpa"'):
        check_compile_config(get_config("bus-tiny", attn_impl="varlen"), "reduce-overhead")
    with pytest.raises(ValueError, match="pad_to_max_length needs max_length"):
        Collator(build_synthetic_tokenizer(16), image_size=32, patch_size=8, pad_to_max_length=True)


@pytest.mark.parametrize("extra, message", [
    (["--compile", "fast"], "--compile: unknown mode 'fast'"),
    (["--compile", "default", "--fsdp"], "--compile with --fsdp is not supported"),
    (["--compile", "reduce-overhead", "--accum-steps", "2"], "--compile reduce-overhead with --accum-steps > 1"),
    (["--model", "bus-tiny.json", "--compile", "default"], 'keep_mode="mass"'),
])
def test_bus_train_rejects_what_cannot_compile(tmp_path, capsys, extra, message):
    if "bus-tiny.json" in extra:
        data = json.loads(open(os.path.join(REPO, "bus_model", "configs", "bus-tiny.json")).read())
        data["selection"]["keep_mode"] = "mass"
        path = tmp_path / "bus-tiny.json"
        path.write_text(json.dumps(data))
        extra = [str(path) if e == "bus-tiny.json" else e for e in extra]
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "run"), "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert "bus train: error:" in err and message in err and "Traceback" not in err


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "tokens_per_s")} for line in f]


@pytest.mark.slow
def test_bus_train_compiled_runs_and_resumes(tmp_path):
    """``bus train --compile``: 2 steps, stop, ``--resume`` to 3 gives the uninterrupted run's metrics bit
    for bit; the checkpoints hold the plain module's weights (no ``_orig_mod.`` prefix) and load with
    ``from_pretrained``."""
    out = tmp_path / "run"
    common = [*TINY, "--steps", "3", "--batch-size", "4", "--train-samples", "24", "--log-every", "1",
              "--save-every", "2", "--lr", "1e-3", *COMPILED]
    assert cli.main(["train", *common, "--out", str(tmp_path / "straight")]) == 0
    torch._dynamo.reset()  # a new process would start with no compiled graphs either
    assert cli.main(["train", *common, "--out", str(out), "--stop-at", "2"]) == 0
    torch._dynamo.reset()
    assert cli.main(["train", *common, "--out", str(out), "--resume"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows == _rows(tmp_path / "straight")  # every loss term, lr and grad norm
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
    path = ckpt.latest_checkpoint(out).path
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    model = BusModel.from_pretrained(path)
    assert parameter_hash(model) == summary["param_sha256"][0]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_compiled(tmp_path):
    """DDP over 2 gloo processes with the compiled step (the module is compiled, then wrapped)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bus_model.training.train", *TINY, "--out", str(out), "--steps", "3", "--batch-size", "4",
           "--train-samples", "32", "--log-every", "1", "--save-every", "3", *COMPILED]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert len(summary["param_sha256"]) == 2 and len(set(summary["param_sha256"])) == 1  # replicas agree
    assert parameter_hash(BusModel.from_pretrained(ckpt.latest_checkpoint(out).path)) == summary["param_sha256"][0]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
