"""ALBEF momentum distillation and the ITC queue: the losses against float64 formulas written here, the
EMA, the FIFO queue (also across 2 gloo ranks), the momentum ViT never seeing text, bad configs."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

import bus_model
from bus_model import BusConfig, LossConfig
from bus_model.losses import itc_loss, masked_mean_cross_entropy
from bus_model.momentum import FeatureQueue, MomentumModel, distilled_mlm_loss, ramped_alpha, soft_itc_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_soft_itc_equals_albef_formula():
    B, K, E, alpha, scale = 5, 7, 6, 0.3, torch.tensor(1 / 0.07, dtype=torch.float64)
    img, txt, img_m, txt_m = (_unit(B, E, seed=s) for s in range(4))
    q_img, q_txt = _unit(K, E, seed=4), _unit(K, E, seed=5)
    img_all, txt_all = torch.cat([img_m, q_img]), torch.cat([txt_m, q_txt])
    got = soft_itc_loss(img, txt, img_all, txt_all, img_m, txt_m, scale, torch.tensor(alpha))
    # ALBEF model_pretrain.py: targets = alpha * softmax(momentum sims) + (1 - alpha) * one-hot on the diagonal
    onehot = torch.zeros(B, B + K, dtype=torch.float64)
    onehot[range(B), range(B)] = 1
    t_i2t = alpha * (img_m @ txt_all.T * scale).softmax(1) + (1 - alpha) * onehot
    t_t2i = alpha * (txt_m @ img_all.T * scale).softmax(1) + (1 - alpha) * onehot
    ref = 0.5 * (-(torch.log_softmax(img @ txt_all.T * scale, 1) * t_i2t).sum(1).mean()
                 - (torch.log_softmax(txt @ img_all.T * scale, 1) * t_t2i).sum(1).mean())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # no queue, alpha 0 and the momentum features equal to the online ones: the plain in-batch ITC
    plain = soft_itc_loss(img, txt, img, txt, img, txt, scale, torch.tensor(0.0))
    torch.testing.assert_close(plain.double(), itc_loss(img, txt, scale.log())[0].double(), rtol=1e-5, atol=1e-6)


def test_distilled_mlm_equals_formula():
    g = torch.Generator().manual_seed(1)
    logits, logits_m = torch.randn(9, 11, generator=g), torch.randn(9, 11, generator=g)
    labels = torch.randint(0, 11, (9,), generator=g)
    labels[[2, 5]] = -100
    alpha = 0.4
    valid = labels != -100
    logp = logits.double().log_softmax(-1)[valid]
    hard = F.nll_loss(logp, labels[valid], reduction="none")
    soft = -(logp * logits_m.double().softmax(-1)[valid]).sum(-1)
    ref = ((1 - alpha) * hard + alpha * soft).mean()
    torch.testing.assert_close(distilled_mlm_loss(logits, labels, logits_m, torch.tensor(alpha)).double(), ref)
    torch.testing.assert_close(distilled_mlm_loss(logits, labels, logits_m, torch.tensor(0.0)),
                               masked_mean_cross_entropy(logits, labels))


def test_ema_and_alpha_ramp():
    online = torch.nn.Module()
    online.vision_proj = torch.nn.Linear(3, 2).double()
    online.text_proj = torch.nn.Linear(3, 2).double()
    mm = MomentumModel(online, 0.9)
    assert mm.parts == ["vision_proj", "text_proj"] and not any(p.requires_grad for p in mm.parameters())
    with torch.no_grad():
        online.vision_proj.weight.add_(1.0)  # changed after construction: the first update copies
    mm.update(online)
    assert torch.equal(mm.vision_proj.weight, online.vision_proj.weight)
    before = mm.vision_proj.weight.clone()
    with torch.no_grad():
        online.vision_proj.weight.mul_(-2.0)
    mm.update(online)
    torch.testing.assert_close(mm.vision_proj.weight, 0.9 * before + 0.1 * online.vision_proj.weight)
    assert int(mm.step) == 2 and not mm.training and not mm.train().training
    alphas = [float(ramped_alpha(0.4, torch.tensor(s), 4)) for s in (0, 1, 2, 4, 9)]
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])


def test_queue_is_fifo_and_checks_divisibility():
    q = FeatureQueue(6, 2)
    first = torch.arange(6.0).view(3, 2)
    q.enqueue(first, -first)
    assert int(q.ptr) == 3 and torch.equal(q.image[:3], first) and torch.equal(q.text[:3], -first)
    q.enqueue(first + 10, first)
    assert int(q.ptr) == 0 and torch.equal(q.image[3:], first + 10)
    q.enqueue(first + 20, first)
    assert torch.equal(q.image[:3], first + 20) and torch.equal(q.image[3:], first + 10)  # oldest replaced
    with pytest.raises(ValueError, match=r"losses\.queue_size \(6\) must be divisible by the global batch size \(4"):
        q.enqueue(torch.zeros(4, 2), torch.zeros(4, 2))


def _gather_worker(rank, port, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial queue on both ranks, as the same seed gives in training
    q = FeatureQueue(8, 3)
    feats = torch.full((2, 3), float(rank + 1))
    q.enqueue(feats, -feats)
    result[rank] = (q.image.clone(), int(q.ptr))
    dist.destroy_process_group()


def test_queue_gathers_every_rank():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_gather_worker, args=(port, result), nprocs=2, join=True)
    (img0, ptr0), (img1, ptr1) = result[0], result[1]
    assert ptr0 == ptr1 == 4 and torch.equal(img0, img1)
    assert torch.equal(img0[:4], torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3]))  # rank order


def _batch(B=4, L=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(4, 128, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones(B, L, dtype=torch.long)
    ids[0, 6:], mask[0, 6:] = 0, 0
    ids[0, 5] = 2
    return images, ids, mask


def _model(**losses):
    torch.manual_seed(0)
    return bus_model.create_model("bus-tiny", kernel_backend="torch",
                                  losses={"momentum_distill": True, "queue_size": 8, **losses})


def test_model_trains_with_momentum_and_the_momentum_vit_never_sees_text(monkeypatch):
    model = _model().train()
    calls = []
    original = model.momentum_model.vision.forward_features
    monkeypatch.setattr(model.momentum_model.vision, "forward_features",
                        lambda images, text_query=None, policy=None: calls.append(text_query) or original(images, text_query, policy))
    images, ids, mask = _batch()
    out = model(images, ids, mask)
    assert calls == [None]
    assert set(out.losses) == {"itc", "itm", "mlm", "prefix_lm"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.momentum_model.parameters())
    assert int(model.itc_queue.ptr) == 4 and int(model.momentum_model.step) == 1
    # the first step copied the online towers
    assert torch.equal(model.momentum_model.vision.pos_embed, model.vision.pos_embed)
    model.eval()  # eval: no EMA step, no enqueue
    model(images, ids, mask)
    assert int(model.itc_queue.ptr) == 4 and int(model.momentum_model.step) == 1


def test_momentum_state_round_trips_through_save_pretrained(tmp_path):
    model = _model().train()
    images, ids, mask = _batch()
    model(images, ids, mask).loss.backward()
    model.save_pretrained(tmp_path)
    loaded = bus_model.BusModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        if key.startswith(("momentum_model.", "itc_queue.")):
            assert torch.equal(loaded.state_dict()[key], value), key
    assert any(k.startswith("momentum_model.vision.") for k in model.state_dict())


def test_momentum_off_is_the_plain_model():
    torch.manual_seed(0)
    off = bus_model.create_model("bus-tiny", kernel_backend="torch")
    assert off.momentum_model is None and off.itc_queue is None
    assert not any(k.startswith(("momentum_model", "itc_queue")) for k in off.state_dict())
    base = bus_model.get_config("bus-base").losses
    assert (base.momentum_distill, base.queue_size, base.momentum, base.distill_alpha) == (True, 65536, 0.995, 0.4)
    assert bus_model.get_config("bus-base-baseline").losses.momentum_distill  # the twin pays the same cost


@pytest.mark.parametrize(
    "losses, field",
    [({"momentum": 1.0}, "losses.momentum"), ({"momentum": -0.1}, "losses.momentum"),
     ({"queue_size": 0}, "losses.queue_size"), ({"distill_alpha": 1.5}, "losses.distill_alpha"),
     ({"alpha_ramp_steps": -1}, "losses.alpha_ramp_steps"), ({"prefix_split": "half"}, "losses.prefix_split")],
)
def test_bad_distillation_config_names_the_field(losses, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        BusConfig(losses=LossConfig(**losses)).validate()
    with pytest.raises(ValueError, match=r"losses\.momentum must be in \[0, 1\)"):
        MomentumModel(torch.nn.Module(), 1.0)


def test_queue_divisibility_error_from_the_model():
    model = _model(queue_size=6).train()
    with pytest.raises(ValueError, match=r"losses\.queue_size \(6\)"):
        model(*_batch(B=4))


@pytest.mark.skipif(os.environ.get("BUS_SKIP_SLOW") == "1", reason="trains twice")
def test_resume_with_momentum_random_policy_and_prefix_lm_is_exact(tmp_path):
    """bus train straight vs stopped + --resume: the momentum model, the queue, the RNG of the random
    masks and of the prefix splits all come back (every logged number equal, bit for bit)."""
    import json

    from bus_model.training import checkpoint as ckpt
    from bus_model.training import cli
    from bus_model.training.distributed import parameter_hash

    config = bus_model.config.load_config_dict("bus-tiny")
    config["selection"] = {**config["selection"], "policy": "random", "layers": [0, 2], "keep_ratios": [0.75, 0.7]}
    config["losses"] = {**config.get("losses", {}), "momentum_distill": True, "queue_size": 16, "alpha_ramp_steps": 3,
                        "prefix_split": "random"}
    path = tmp_path / "tiny-momentum.json"
    path.write_text(json.dumps(config))
    common = ["train", "--model", str(path), "--data", "synthetic", "--num-threads", "1", "--no-progress",
              "--steps", "6", "--batch-size", "4", "--train-samples", "20", "--log-every", "1", "--lr", "1e-3",
              "--save-every", "3", "--warmup-steps", "1"]

    def rows(out):
        with open(out / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "tokens_per_s")} for line in f]

    assert cli.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "split"), "--stop-at", "3"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [r["step"] for r in resumed] == list(range(1, 7)) and resumed == straight
    a = bus_model.BusModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "straight").path)
    b = bus_model.BusModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "split").path)
    assert parameter_hash(a) == parameter_hash(b)
    assert torch.equal(a.itc_queue.image, b.itc_queue.image) and int(a.momentum_model.step) == 6


def test_optimizer_hook_gives_the_same_run_as_the_forward_update():
    """bus train's EMA step after optimizer.step() == ALBEF's at the start of the next forward."""
    from bus_model.momentum import attach_to_optimizer

    images, ids, mask = _batch()
    runs = []
    for attach in (False, True):
        model = _model().train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if attach:
            attach_to_optimizer(model, opt)
            assert not model.momentum_model.update_in_forward and bool(model.momentum_model.initialized)
        losses = []
        for step in range(3):
            torch.manual_seed(step)
            out = model(images, ids, mask)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append({k: float(v.detach()) for k, v in out.losses.items()})
        runs.append((losses, model))
    (la, a), (lb, b) = runs
    assert la == lb
    # the hook already took the EMA step after the last update; the forward path takes it next forward
    a.momentum_model.update(a)
    for (name, pa), pb in zip(a.momentum_model.named_parameters(), b.momentum_model.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.skipif(os.environ.get("BUS_SKIP_SLOW") == "1", reason="4 torchrun jobs")
def test_ddp_and_fsdp_train_with_momentum(tmp_path):
    """2 gloo ranks: DDP keeps momentum towers and queues identical on both; FSDP2 (sharded EMA) trains
    the same model."""
    import json
    import subprocess
    import sys

    config = bus_model.config.load_config_dict("bus-tiny")
    config["losses"] = {**config.get("losses", {}), "momentum_distill": True, "queue_size": 16, "alpha_ramp_steps": 2}
    path = tmp_path / "tiny-momentum.json"
    path.write_text(json.dumps(config))
    rows = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "bus_model.training.train", "--model", str(path), "--data", "synthetic", "--num-threads", "1",
               "--no-progress", "--out", str(out), "--steps", "3", "--batch-size", "4", "--train-samples", "32",
               "--log-every", "1", "--save-every", "3", *(["--fsdp"] if mode == "fsdp" else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert len(set(summary["param_sha256"])) == 1  # momentum towers included
        with open(out / "metrics.jsonl") as f:
            rows[mode] = [json.loads(line) for line in f]
        from bus_model.training import checkpoint as ckpt

        saved = bus_model.BusModel.from_pretrained(ckpt.latest_checkpoint(out).path)
        assert int(saved.itc_queue.ptr) == (3 * 8) % 16 and int(saved.momentum_model.step) == 3  # global batch 8
    for a, b in zip(rows["ddp"], rows["fsdp"], strict=True):
        for key in a:
            if key.startswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
