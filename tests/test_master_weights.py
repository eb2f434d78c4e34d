"""``--bf16-weights`` (issue 22): bf16 working weights, fp32 masters in the optimizer; fewer dispatched ops."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bus_benchmarks.dispatch_count import DispatchCounter
from bus_benchmarks.train_speed import build_model_and_data
from bus_model.model import BusModel
from bus_model.training import checkpoint as ckpt
from bus_model.training import cli
from bus_model.training.master_weights import MasterWeights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model", "bus-tiny", "--data", "synthetic", "--num-threads", "1", "--no-progress"]


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 5))
    torch.nn.init.normal_(model[2].weight)  # values bf16 cannot hold exactly
    return model


def test_working_weights_are_bf16_and_masters_fp32_copies():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    master = MasterWeights(model)
    assert model[0].weight.dtype == model[2].weight.dtype == model[2].bias.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32  # norms stay fp32
    assert [m.dtype for m in master.masters] == [torch.float32] * 3
    assert master.masters[1].shape == (5, 6)  # embedding, then the linear's weight and bias
    torch.testing.assert_close(master.masters[1], before["2.weight"], rtol=0, atol=0)  # exact, not rounded
    with master.full_precision():
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model[2].weight.dtype == torch.bfloat16


def test_a_step_updates_the_masters_in_fp32_and_rounds_them_into_the_weights():
    model = _tiny()
    reference = _tiny()  # the same weights, plain fp32 under autocast
    master = MasterWeights(model)
    groups = master.optimizer_params([{"params": list(model.parameters())}])
    opt = torch.optim.AdamW(groups, lr=1e-3)
    opt.register_step_post_hook(lambda *_: master.masters_to_weights())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ids = torch.randint(0, 11, (3, 4))
    for m, o in ((model, opt), (reference, ref_opt)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids).float().square().mean()
        loss.backward()
        if m is model:
            master.grads_to_masters()
            assert model[2].weight.grad is None and master.masters[1].grad.dtype == torch.float32
        o.step()
    # the same bf16 forward, so the same gradients up to bf16 rounding, hence nearly the same update
    torch.testing.assert_close(master.masters[1], reference[2].weight.detach(), rtol=0, atol=2e-3)
    torch.testing.assert_close(model[2].weight.float(), master.masters[1].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert not torch.equal(master.masters[1], _tiny()[2].weight.detach())  # it moved


def test_bf16_weights_cut_the_dispatched_ops_of_a_bus_small_step():
    """The casts of every matmul weight and its gradient are gone: bus-small with the master copies counted
    (2 multi-tensor copies) dispatches at most 4000 ops per step (3880 measured; 4475 with fp32 weights under
    autocast)."""
    model, data = build_model_and_data("bus-small", 2, 0, None, torch.device("cpu"), {"kernel_backend": "native"})
    master = MasterWeights(model)
    opt = torch.optim.AdamW(master.optimizer_params([{"params": list(model.parameters())}]), lr=1e-4, fused=True)
    opt.register_step_post_hook(lambda *_: master.masters_to_weights())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*[t.clone() for t in data[0]])
        out.loss.backward()
        master.grads_to_masters()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with DispatchCounter(model) as counter:
        step()
    assert counter.total <= 4000, dict(counter.by_part)
    assert counter.by_op.get("aten::_foreach_copy_", 0) == 2


@pytest.mark.slow
def test_bus_train_bf16_weights_resumes_exactly(tmp_path):
    common = ["--steps", "4", "--batch-size", "4", "--train-samples", "16", "--log-every", "1", "--lr", "1e-3",
              "--save-every", "2", "--warmup-steps", "1", "--amp", "--bf16-weights"]
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "straight"), *common]) == 0
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "split"), *common, "--stop-at", "2"]) == 0
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "split"), *common, "--resume"]) == 0

    def rows(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "tokens_per_s")}
                    for line in f]

    assert rows(tmp_path / "split") == rows(tmp_path / "straight")
    # checkpoints hold the fp32 masters: not every value is representable in bf16
    saved = BusModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "straight").path)
    weight = saved.fusion.encoder.layer[0].attention.self.qkv.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.to(torch.bfloat16).float())


@pytest.mark.parametrize("extra, words", [(["--no-amp"], "--amp"), (["--amp", "--accum-steps", "2"], "--accum-steps"),
                                          (["--amp", "--fsdp"], "FSDP")])
def test_bf16_weights_flag_errors(tmp_path, capsys, extra, words):
    code = cli.main(["train", *TINY, "--out", str(tmp_path / "x"), "--steps", "1", "--batch-size", "2",
                     "--bf16-weights", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert "--bf16-weights" in err and words in err


@pytest.mark.slow
def test_bf16_weights_under_torchrun_ddp(tmp_path):
    """2 gloo ranks: DDP all-reduces the bf16 gradients; the replicas stay identical."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bus_model.training.train", *TINY, "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
           "--train-samples", "16", "--save-every", "2", "--amp", "--bf16-weights"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert len(set(summary["param_sha256"])) == 1
