"""BusModel on bus-tiny: losses, gradients, sdpa vs varlen, training steps, save/load, inference, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import bus_kernels
import bus_model
from bus_model.config import TextConfig
from bus_model.losses import mask_tokens, mine_hard_negatives, ptm_loss
from bus_model.selection import SelectionRecord


pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCAB = 128


def _batch(B=3, L=10, seed=0, image_size=32, num_patches=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, image_size, image_size, generator=g)
    ids = torch.randint(4, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = [L, L - 3, L - 5][:B] + [L] * max(0, B - 3)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = 1, 2  # [CLS] ... [SEP]
        ids[b, n:], mask[b, n:] = 0, 0
    labels = torch.rand(B, num_patches, generator=g).round()
    labels[-1] = -1  # the last sample has no patch labels
    return images, ids, mask, labels


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return bus_model.create_model("bus-tiny", kernel_backend="torch")


def test_registry_and_configs():
    names = bus_model.list_models()
    for name in ("bus-tiny", "bus-small", "bus-base", "bus-base-384"):
        assert name in names and f"{name}-baseline" in names
        base = bus_model.get_config(f"{name}-baseline")
        assert base.selection.policy == "none" and not base.pad.enabled
        assert bus_model.get_config(name).selection.policy == "bus"
    cfg = bus_model.get_config("bus-base")
    assert (cfg.vision.width, cfg.vision.depth, cfg.text.num_layers, cfg.fusion_layers, cfg.decoder_layers,
            cfg.pad.num_queries) == (768, 12, 6, 6, 12, 64)
    assert bus_model.get_config("bus-tiny", selection__policy="evit").selection.policy == "evit"
    for name in ("elip-base", "elip-small"):  # ELIP's official ALBEF/BLIP schedule, on the baseline stack
        s = bus_model.get_config(name).selection
        assert (s.policy, s.layers, s.lookahead, s.keep_ratios) == ("elip", (2, 4, 10), (2, 6, 2), (0.9, 0.65, 0.4))
        assert (s.ratio_of, s.keep_rounding, s.text_free) == ("original", "floor", "auto")
        assert not bus_model.get_config(name).pad.enabled and f"{name}-baseline" in names
    with pytest.raises(ValueError, match="unknown model name"):
        bus_model.create_model("bus-huge")
    with pytest.raises(ValueError, match="unknown field"):
        bus_model.get_config("bus-tiny", vision={"widht": 3})


def test_every_loss_finite_and_every_parameter_gets_a_gradient(tiny):
    images, ids, mask, labels = _batch()
    tiny.zero_grad(set_to_none=True)
    out = tiny(images, ids, mask, patch_labels=labels)
    assert set(out.losses) == {"itc", "itm", "mlm", "prefix_lm", "ptm"}
    for name, value in out.losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    out.loss.backward()
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
    assert tiny.vision.text_query_proj is not None  # text width 48 != vision width 64: TSPS maps it
    assert out.memory.shape == (3, 1 + 4, 64)  # [CLS] + 4 PAD queries


def test_baseline_has_no_selection_and_sees_all_tokens():
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny-baseline")
    images, ids, mask, labels = _batch()
    out = model(images, ids, mask, patch_labels=labels)
    assert "ptm" not in out.losses and out.selections == [] and model.pad is None
    assert out.memory.shape == (3, 17, 64)  # every ViT token
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("policy", ["evit", "elip", "random", "tome", "none"])
def test_other_policies_train(policy):
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny", selection={"policy": policy}, text={"hidden_size": 64},
                                   kernel_backend="torch")
    images, ids, mask, labels = _batch()
    out = model(images, ids, mask, patch_labels=labels)
    # PTM trains a selector with gradients: EViT's (through qkv), not ELIP's no-grad look-ahead
    assert ("ptm" in out.losses) == (policy == "evit")
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_elip_needs_equal_widths():
    with pytest.raises(ValueError, match="elip"):
        bus_model.create_model("bus-tiny", selection={"policy": "elip"})


def test_losses_can_be_switched_off():
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny", losses={"itm": False, "mlm": False, "ptm": False})
    assert model.itm_head is None and model.mlm_head is None
    images, ids, mask, labels = _batch()
    out = model(images, ids, mask, patch_labels=labels)
    assert set(out.losses) == {"itc", "prefix_lm"}
    with pytest.raises(ValueError, match="every loss is switched off"):
        bus_model.create_model("bus-tiny", losses={k: False for k in ("itc", "itm", "mlm", "prefix_lm", "ptm")})(
            images, ids, mask)


@pytest.mark.parametrize("keep_mode", ["ratio", "mass"])
def test_sdpa_and_varlen_agree(keep_mode):
    assert hasattr(bus_kernels, "varlen_attention"), "bus_kernels.varlen_attention is part of the contract"
    selection = {"keep_mode": keep_mode, "keep_mass": 0.6, "keep_ratios": [0.9, 0.9]}
    torch.manual_seed(0)
    sdpa = bus_model.create_model("bus-tiny", selection=selection, kernel_backend="torch")
    varlen = bus_model.create_model("bus-tiny", selection=selection, kernel_backend="torch", attn_impl="varlen")
    with torch.no_grad():  # sharper selector queries, so keep_by_mass keeps a different count per image
        for i in (1, 2):
            sdpa.vision.blocks[i].attn.qkv.weight[:64] *= 20
    varlen.load_state_dict(sdpa.state_dict())
    images, ids, mask, labels = _batch(seed=3)
    outs = []
    for model in (sdpa, varlen):
        torch.manual_seed(7)  # same MLM masks and ITM negatives
        out = model(images, ids, mask, patch_labels=labels)
        out.loss.backward()
        outs.append(out)
    if keep_mode == "mass":
        assert outs[0].selections[0].num_kept.unique().numel() > 1, "want a ragged batch"
    for name in outs[0].losses:
        torch.testing.assert_close(outs[0].losses[name], outs[1].losses[name], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(sdpa.named_parameters(), varlen.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_varlen_path_calls_the_kernel(monkeypatch):
    calls = []
    original = bus_kernels.varlen_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("causal", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(bus_kernels, "varlen_attention", spy)
    model = bus_model.create_model("bus-tiny", attn_impl="varlen", kernel_backend="torch")
    images, ids, mask, labels = _batch()
    model(images, ids, mask, patch_labels=labels)
    assert calls and any(calls) and not all(calls)  # decoder (causal) and the rest


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = bus_model.create_model("bus-tiny", kernel_backend="torch")
    images, ids, mask, labels = _batch(B=4, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(8):
        torch.manual_seed(1)  # the same masks and negatives each step: a fixed objective
        out = model(images, ids, mask, patch_labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(out.loss.item())
    assert history[-1] < 0.8 * history[0], history


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = bus_model.BusModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == tiny.config
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    images, ids, mask, labels = _batch()
    tiny.eval(), loaded.eval()
    outs = []
    for model in (tiny, loaded):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(model(images, ids, mask, patch_labels=labels))
    for name in outs[0].losses:
        assert torch.equal(outs[0].losses[name], outs[1].losses[name]), name
    with pytest.raises(FileNotFoundError):
        bus_model.BusModel.from_pretrained(tmp_path / "nothing")


def test_inference_api(tiny):
    images, ids, mask, _ = _batch()
    tiny.eval()
    img = tiny.encode_image(images)
    txt = tiny.encode_text(ids, mask)
    assert img.embedding.shape == txt.embedding.shape == (3, 32)
    torch.testing.assert_close(img.embedding.norm(dim=-1), torch.ones(3))
    assert img.features.selections and img.features.selections[0].num_kept.tolist() == [11, 11, 11]
    scores = tiny.itm_score(images, ids, mask)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    greedy = tiny.generate(images, max_length=6)
    assert greedy.shape[0] == 3 and greedy.shape[1] <= 6 and (greedy[:, 0] == 1).all()
    beam = tiny.generate(images, max_length=6, num_beams=3)
    assert beam.shape[0] == 3 and (beam[:, 0] == 1).all()
    with pytest.raises(ValueError, match="num_beams"):
        tiny.generate(images, num_beams=0)


def test_beam_search_is_exact_when_beams_cover_the_vocabulary(tiny):
    """With as many beams as vocabulary entries and two decoding steps, beam search (no length
    penalty) must return the most likely caption; checked against exhaustive enumeration."""
    images = _batch(B=2, seed=9)[0]
    tiny.eval()
    beam = tiny.generate(images, max_length=3, num_beams=VOCAB, length_penalty=0.0)
    memory = tiny.encode_image(images).memory
    with torch.no_grad():
        for b in range(2):
            first = tiny.decoder(torch.tensor([[1]]), None, memory[b : b + 1])[0, -1].log_softmax(-1)  # (V,)
            pairs = torch.stack([torch.ones(VOCAB, dtype=torch.long), torch.arange(VOCAB)], 1)  # [BOS, a]
            second = tiny.decoder(pairs, None, memory[b : b + 1].expand(VOCAB, -1, -1))[:, -1].log_softmax(-1)
            totals = first[:, None] + second  # (a, b) log-probabilities
            totals[2] = float("-inf")  # after [SEP] (id 2) the caption is over
            best_pair = totals.max().item()
            best = max(first[2].item(), best_pair)
            seq = beam[b]
            if seq[1] == 2:
                got = first[2].item()
            else:
                got = totals[seq[1], seq[2]].item()
            assert got == pytest.approx(best, abs=1e-5)


def test_bad_inputs_raise_clear_errors(tiny, monkeypatch):
    images, ids, mask, labels = _batch()
    monkeypatch.setattr(tiny, "check_input_values", True)  # value checks read the device: opt-in
    with pytest.raises(ValueError, match="px"):
        tiny(torch.randn(3, 3, 48, 48), ids, mask)
    with pytest.raises(ValueError, match="channels"):
        tiny(torch.randn(3, 1, 32, 32), ids, mask)
    bad = ids.clone()
    bad[0, 1] = VOCAB
    with pytest.raises(ValueError, match="vocab"):
        tiny(images, bad, mask)
    with pytest.raises(ValueError, match="vocab"):
        tiny(images, ids - 5, mask)
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny(images, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="batch"):
        tiny(images[:2], ids, mask)
    with pytest.raises(TypeError, match="input_ids"):
        tiny(images, ids.float(), mask)
    with pytest.raises(ValueError, match="patch_labels"):
        tiny(images, ids, mask, patch_labels=labels[:, :5])
    with pytest.raises(ValueError, match="batch size must be >= 2"):
        tiny(images[:1], ids[:1], mask[:1])
    with pytest.raises(ValueError, match="keep_ratios"):
        bus_model.create_model("bus-tiny", selection={"keep_ratios": [0.5, 0.0]})
    with pytest.raises(ValueError, match="keep_ratios"):
        bus_model.create_model("bus-tiny", selection={"keep_ratios": [1.01, 0.5]})
    with pytest.raises(ValueError, match="policy"):
        bus_model.create_model("bus-tiny", selection={"policy": "flip"})
    with pytest.raises(ValueError, match="attn_impl"):
        bus_model.create_model("bus-tiny", attn_impl="flash")


def test_mask_tokens_follows_bert():
    text = TextConfig(vocab_size=VOCAB, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    torch.manual_seed(0)
    B, L = 64, 40
    ids = torch.randint(4, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[:8, 20:], mask[:8, 20:] = 0, 0
    ids[:8, 19] = 2
    masked, positions, labels = mask_tokens(ids, mask, text, 0.15)
    used = labels != -100
    # predicted positions are real, non-special tokens, and the labels are the original ids
    assert (ids.gather(1, positions)[used] == labels[used]).all()
    assert mask.gather(1, positions)[used].all()
    assert not (ids.gather(1, positions)[used] <= 2).any()
    counts = used.sum(1)
    assert counts[:8].tolist() == [round(0.15 * 18)] * 8 and counts[8:].tolist() == [round(0.15 * 38)] * 56
    # untouched elsewhere; 80% of the predicted tokens became [MASK] (binomial, 5 sigma)
    changed = masked != ids
    chosen = torch.zeros_like(changed).scatter(1, positions, used)
    assert not (changed & ~chosen).any()
    share = (masked.gather(1, positions)[used] == 3).float().mean().item()
    n = used.sum().item()
    assert abs(share - 0.8) < 5 * math.sqrt(0.16 / n)


def test_hard_negatives_are_never_the_positive():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    for mode in ("sample", "hardest"):
        neg_text, neg_image = mine_hard_negatives(sim, mode)
        assert (neg_text != torch.arange(6)).all() and (neg_image != torch.arange(6)).all()
    off = sim.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    neg_text, neg_image = mine_hard_negatives(sim, "hardest")
    assert torch.equal(neg_text, off.argmax(1)) and torch.equal(neg_image, off.argmax(0))


@pytest.mark.parametrize("mode", ["sample", "hardest"])
def test_random_share_of_itm_negatives(mode):
    """losses.itm_random_share: with share 1 every negative is a uniform draw among the non-matching entries
    (whatever the similarities say); with share s about s of them are (the rest mined as before)."""
    B, draws = 7, 3000
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    sim = torch.randn(B, B) * 50  # extremely peaked: mining alone would nearly always pick the argmax
    off = sim.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    counts = torch.zeros(B, B)
    hits = 0
    for _ in range(draws):
        neg_text, neg_image = mine_hard_negatives(sim, mode, random_share=1.0)
        assert (neg_text != torch.arange(B)).all() and (neg_image != torch.arange(B)).all()
        counts[torch.arange(B), neg_text] += 1
        hits += int((neg_text == off.argmax(1)).sum())
    # uniform over the B - 1 others: each cell ~ draws / 6 = 500, std ~ 20.4; 6 std allowed
    expected = draws / (B - 1)
    off_diag = counts[~torch.eye(B, dtype=torch.bool)]
    assert (off_diag - expected).abs().max() < 6 * math.sqrt(expected * (1 - 1 / (B - 1)))
    assert counts.diagonal().sum() == 0
    # share 0.5: the argmax is hit by the mined half (about all of it here) plus 1/6 of the random half
    hits_half = sum(int((mine_hard_negatives(sim, mode, random_share=0.5)[0] == off.argmax(1)).sum())
                    for _ in range(400)) / (400 * B)
    mined_argmax = sum(int((mine_hard_negatives(sim, mode)[0] == off.argmax(1)).sum()) for _ in range(100)) / (100 * B)
    want = 0.5 * mined_argmax + 0.5 / (B - 1)
    assert abs(hits_half - want) < 6 * math.sqrt(want * (1 - want) / (400 * B))
    assert hits / (draws * B) < 0.2  # share 1 ignores the similarities


def test_random_share_traces_on_meta_and_is_validated():
    neg_text, neg_image = mine_hard_negatives(torch.randn(5, 5, device="meta"), "sample", random_share=0.5)
    assert neg_text.shape == (5,) and neg_image.device.type == "meta"
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="losses.itm_random_share"):
            bus_model.create_model("bus-tiny", losses={"itm_random_share": bad})


def test_ptm_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    B, P = 3, 12
    labels = torch.rand(B, P).round()
    labels[1] = -1  # unlabelled sample
    s1 = torch.rand(B, P).softmax(1)
    pos1 = torch.arange(P).expand(B, P)
    s2 = torch.rand(B, 6).softmax(1)
    pos2 = torch.tensor([[0, 3, 4, 7, 9, -1]] * B)
    records = [SelectionRecord(1, s1, pos1, pos1, torch.full((B,), P)),
               SelectionRecord(2, s2, pos2, pos2[:, :5], torch.full((B,), 5))]
    got = ptm_loss(records, labels)
    terms = []
    for b in (0, 2):
        for j in range(P):
            terms.append(F.binary_cross_entropy_with_logits(torch.log(P * s1[b, j]).double(), labels[b, j].double()))
        for j in range(5):
            p = pos2[b, j]
            terms.append(F.binary_cross_entropy_with_logits(torch.log(5 * s2[b, j]).double(), labels[b, p].double()))
    torch.testing.assert_close(got.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    none = ptm_loss(records, torch.full((B, P), -1.0))
    assert none.item() == 0.0


def test_itc_loss_matches_a_direct_computation():
    from bus_model.losses import itc_loss

    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss, sim = itc_loss(img, txt, scale)
    logits = (img @ txt.t() / 0.07).tolist()
    ref = 0.0
    for i in range(5):
        row = [logits[i][j] for j in range(5)]
        col = [logits[j][i] for j in range(5)]
        ref += 0.5 * (math.log(sum(math.exp(v) for v in row)) - row[i]) / 5
        ref += 0.5 * (math.log(sum(math.exp(v) for v in col)) - col[i]) / 5
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    # the learned temperature is clamped to [0.001, 0.5]
    _, sim_hot = itc_loss(img, txt, torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(sim_hot, img @ txt.t() * 1000.0)


def test_prefix_lm_loss_matches_a_direct_computation(tiny):
    images, ids, mask, _ = _batch(seed=4)
    memory = tiny.encode_image(images).memory.detach()
    got = tiny.decoder.loss(ids, mask, memory)
    terms = []
    for b in range(3):
        n = int(mask[b].sum())
        logits = tiny.decoder(ids[b : b + 1, : n - 1], None, memory[b : b + 1])[0].double()  # (n-1, V)
        terms += [-logits.log_softmax(-1)[t, ids[b, t + 1]] for t in range(n - 1)]
    torch.testing.assert_close(got.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
