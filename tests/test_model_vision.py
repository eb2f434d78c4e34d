"""BusViT: timm equality with selection off, token selection against a float64 reference, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from bus_model import BusViT, SelectionConfig, VisionConfig

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def test_policy_none_equals_timm(timm_vit):
    vit = BusViT.from_timm(timm_vit, policy="none").eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = vit.forward_features(images)
        ref = timm_vit.forward_features(images)
    assert ours.mask is None and ours.selections == []
    assert ours.tokens.shape == ref.shape == (2, 197, 192)
    torch.testing.assert_close(ours.tokens, ref, rtol=1e-5, atol=1e-5)


def test_from_timm_checkpoint_file(timm_vit, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, str(path))
    vit = BusViT.from_timm(path, policy="evit", layers=(3, 6, 9), keep_ratios=(0.7, 0.7, 0.7)).eval()
    assert vit.vision_config.width == 192 and vit.vision_config.num_heads == 3 and vit.vision_config.depth == 12
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(images, policy="none").tokens, timm_vit.forward_features(images), rtol=1e-5, atol=1e-5
        )
        out = vit.forward_features(images)
    # 196 -> 137 kept (+1 fused) -> 97 (+1) -> 69 (+1), plus [CLS]
    assert out.tokens.shape == (1, 1 + 69 + 1, 192)
    assert [r.num_kept.tolist() for r in out.selections] == [[137], [97], [69]]


def test_from_timm_bad_inputs(timm_vit, tmp_path):
    with pytest.raises(TypeError, match="model_or_checkpoint_path"):
        BusViT.from_timm(3)
    with pytest.raises(FileNotFoundError):
        BusViT.from_timm(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="unknown prune option"):
        BusViT.from_timm(timm_vit, policy="evit", keep=0.5)
    with pytest.raises(ValueError, match="keep_ratios"):
        BusViT.from_timm(timm_vit, policy="evit", layers=(3,), keep_ratios=(1.5,))


def _tiny(policy, text_width=40, **sel):
    vision = VisionConfig(image_size=40, patch_size=8, width=48, depth=4, num_heads=3, mlp_ratio=2.0)
    sel.setdefault("layers", (1, 2))
    sel.setdefault("keep_ratios", (0.6, 0.5))
    selection = SelectionConfig(policy=policy, **sel)
    return BusViT(vision, selection, text_width=text_width, kernel_backend="torch").double().eval()


def _reference_forward(vit, images, text_query, policy):
    """Float64 reference of bus/evit selection written with plain torch ops (no bus_kernels)."""
    C = vit.vision_config.width
    H = vit.vision_config.num_heads
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1) + vit.pos_embed
    t = vit.text_query_proj(text_query) if text_query is not None else None
    for i, blk in enumerate(vit.blocks):
        B, N, _ = x.shape
        h = blk.norm1(x)
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, D)
        att = (q @ k.transpose(-1, -2) * (C // H) ** -0.5).softmax(-1)
        x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        if i in vit.selection.layers:
            if policy == "bus":
                tq = F.linear(blk.norm1(t), blk.attn.qkv.weight[:C], blk.attn.qkv.bias[:C]).view(B, H, 1, C // H)
            else:
                tq = q[:, :, :1]
            s = (tq @ k[:, :, 1:].transpose(-1, -2) * (C // H) ** -0.5).softmax(-1).mean(1)[:, 0]  # (B, n)
            s = s.float().double()  # the selector's scores are float32 by contract
            n = s.shape[1]
            keep = min(n, max(1, round(vit.selection.keep_ratios[vit.selection.layers.index(i)] * n)))
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :keep].sort(1).values
            dropped = torch.ones_like(s, dtype=torch.bool).scatter(1, order, False)
            cand = x[:, 1:]
            kept = cand.gather(1, order[:, :, None].expand(-1, -1, C))
            w = s * dropped
            fused = (w[:, :, None] * cand).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
            x = torch.cat([x[:, :1], kept, fused[:, None]], 1)
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    return vit.norm(x)


@pytest.mark.parametrize("policy", ["bus", "evit"])
def test_selection_matches_float64_reference(policy):
    torch.manual_seed(1)
    vit = _tiny(policy)
    images = torch.randn(3, 3, 40, 40, dtype=torch.float64)
    text = torch.randn(3, 40, dtype=torch.float64) if policy == "bus" else None
    with torch.no_grad():
        out = vit.forward_features(images, text)
        ref = _reference_forward(vit, images, text, policy)
    # 25 patches -> 15 kept + 1 fused -> 8 kept + 1 fused
    assert out.tokens.shape == ref.shape == (3, 1 + 8 + 1, 48)
    torch.testing.assert_close(out.tokens, ref, rtol=1e-5, atol=1e-6)  # scores are float32
    first, second = out.selections
    assert first.scores.shape == (3, 25) and second.scores.shape == (3, 16)
    torch.testing.assert_close(first.scores.sum(1), torch.ones(3, dtype=first.scores.dtype))
    assert (second.positions[:, -1] == -1).all()  # the fused token has no original patch
    assert (first.kept_positions.diff(dim=1) > 0).all()


def test_bus_without_text_falls_back_to_evit():
    torch.manual_seed(2)
    vit = _tiny("bus")
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        out = vit.forward_features(images)
        ref = _reference_forward(vit, images, None, "evit")
    torch.testing.assert_close(out.tokens, ref, rtol=1e-5, atol=1e-6)


def _official_elip(vit, images, text_cls, begin, active, keep_ratios, visual_weight=0.8):
    """ELIP's ViT forward as its official code computes it (guoyang9/ELIP ``ALBEF/models/vit.py``),
    re-computed here in float64 with plain torch ops: at each begin layer, a no-grad copy of the tokens
    gets [CLS] := 0.8 * [CLS] + 0.2 * text [CLS], runs ``active - 1`` full blocks and the attention of
    the next; the [CLS] row of that softmax (over all keys, mean over heads), [CLS] column dropped,
    ranks the candidates; the top ``int(num_patches * ratio)`` stay in position order, the rest merge
    into one token weighted by their renormalised scores. Returns (final tokens, kept positions per
    stage, scores per stage)."""
    C, H = vit.vision_config.width, vit.vision_config.num_heads
    D = C // H
    num_keep = [int(vit.num_patches * r) for r in keep_ratios]

    def run(blk, x, attn_only=False):
        B, N, _ = x.shape
        q, k, v = F.linear(blk.norm1(x), blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * D**-0.5).softmax(-1)  # (B, H, N, N)
        if attn_only:
            return att
        x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))

    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1) + vit.pos_embed
    pos = torch.arange(vit.num_patches).expand(x.shape[0], -1)  # original patch of each candidate, -1: merged
    kept, all_scores = [], []
    for i, blk in enumerate(vit.blocks):
        if text_cls is not None and i in begin:
            stage = begin.index(i)
            tmp = x.clone()
            tmp[:, 0] = (1 - visual_weight) * text_cls + visual_weight * tmp[:, 0]
            for j in range(active[stage] - 1):
                tmp = run(vit.blocks[i + j], tmp)
            scores = run(vit.blocks[i + active[stage] - 1], tmp, attn_only=True).mean(1)[:, 0, 1:]
            values, order = scores.sort(dim=-1, descending=True)
            n = num_keep[stage]
            keep_ind = order[:, :n].sort(dim=-1).values
            w = values[:, n:] / (values[:, n:].sum(-1, keepdim=True) + 1e-6)
            cand = x[:, 1:]
            merged = (cand.gather(1, order[:, n:, None].expand(-1, -1, C)) * w[..., None]).sum(1, keepdim=True)
            x = torch.cat([x[:, :1], cand.gather(1, keep_ind[..., None].expand(-1, -1, C)), merged], 1)
            kept.append(pos.gather(1, keep_ind))
            all_scores.append(scores)
            pos = torch.cat([kept[-1], torch.full_like(pos[:, :1], -1)], 1)
        x = run(blk, x)
    return vit.norm(x), kept, all_scores


# the official schedules: (begin layers, active layers, keep ratios)
ELIP_ALBEF = ((2, 4, 10), (2, 6, 2), (0.90, 0.65, 0.40))
ELIP_METER = ((2, 4, 9), (2, 5, 2), (0.90, 0.70, 0.45))


def _elip_vit(schedule, **extra):
    begin, active, ratios = schedule
    vision = VisionConfig(image_size=56, patch_size=8, width=48, depth=12, num_heads=3, mlp_ratio=2.0)
    selection = SelectionConfig(policy="elip", layers=begin, lookahead=active, keep_ratios=ratios,
                                ratio_of="original", keep_rounding="floor", **extra)
    return BusViT(vision, selection, text_width=48, kernel_backend="torch").double().eval()


@pytest.mark.parametrize("schedule", [ELIP_ALBEF, ELIP_METER], ids=["albef-blip", "meter"])
def test_elip_equals_official_algorithm(schedule):
    torch.manual_seed(3)
    vit = _elip_vit(schedule)
    assert vit.text_query_proj is None  # parameter-free
    images = torch.randn(3, 3, 56, 56, dtype=torch.float64, requires_grad=True)
    text = torch.randn(3, 48, dtype=torch.float64)
    out = vit.forward_features(images, text)
    with torch.no_grad():
        ref_tokens, ref_kept, ref_scores = _official_elip(vit, images, text, *schedule)
    counts = [int(49 * r) for r in schedule[2]]  # floor of the original 49 patches
    assert [r.num_kept.tolist() for r in out.selections] == [[c] * 3 for c in counts]
    for stage, rec in enumerate(out.selections):  # all three stages
        assert torch.equal(rec.kept_positions, ref_kept[stage]), stage
        torch.testing.assert_close(rec.scores.double(), ref_scores[stage], rtol=1e-5, atol=1e-7)  # float32 scores
        assert (rec.scores.sum(1) < 1).all()  # the [CLS] column took its share: no renormalisation
        assert not rec.scores.requires_grad  # look-ahead without gradients
    assert out.tokens.shape == ref_tokens.shape == (3, 1 + counts[-1] + 1, 48)
    # the merged token: official weights w / (sum w + 1e-6), ours w / max(sum w, 1e-6)
    torch.testing.assert_close(out.tokens, ref_tokens, rtol=1e-4, atol=1e-5)
    out.tokens.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_elip_text_free_behaviour():
    torch.manual_seed(5)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        out = _elip_vit(ELIP_ALBEF).forward_features(images)  # ELIP's default: prune nothing without text
        assert out.selections == [] and out.tokens.shape == (2, 50, 48)
        vit = _elip_vit(ELIP_ALBEF, text_free="evit")  # opt in: the visual [CLS] alone guides the look-ahead
        out = vit.forward_features(images)
        _, ref_kept, _ = _official_elip(vit, images, torch.zeros(2, 48, dtype=torch.float64), *ELIP_ALBEF,
                                        visual_weight=1.0)
    assert [torch.equal(r.kept_positions, k) for r, k in zip(out.selections, ref_kept)] == [True] * 3


def test_bus_text_free_none_prunes_nothing():
    torch.manual_seed(6)
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        out = _tiny("bus", text_free="none").forward_features(images)
    assert out.selections == [] and out.tokens.shape == (2, 26, 48)


def test_keep_by_mass_ragged_matches_per_image_runs():
    """Ragged selection (a different keep count per image) gives each image what it gets alone."""
    torch.manual_seed(4)
    vit = _tiny("evit", keep_mode="mass", keep_mass=0.5, min_keep_ratio=0.1, keep_ratios=(0.9, 0.9))
    images = torch.randn(3, 3, 40, 40, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3]).double()[:, None, None, None]
    with torch.no_grad():
        out = vit.forward_features(images)
        counts = [r.num_kept for r in out.selections]
        for b in range(3):
            alone = vit.forward_features(images[b : b + 1])
            n = int(out.mask[b].sum()) if out.mask is not None else out.tokens.shape[1]
            assert alone.tokens.shape[1] == n
            # batched rows are scored with a masked softmax, a lone image with the kernel: float32 scores
            torch.testing.assert_close(out.tokens[b, :n], alone.tokens[0], rtol=1e-5, atol=1e-6)
            assert [int(c[b]) for c in counts] == [int(r.num_kept[0]) for r in alone.selections]
    assert out.mask is not None and out.mask[:, 0].all()


def test_bad_images_raise():
    vit = _tiny("evit")
    with pytest.raises(ValueError, match="channels"):
        vit.forward_features(torch.randn(1, 1, 40, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="px"):
        vit.forward_features(torch.randn(1, 3, 48, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vit.forward_features(torch.randn(3, 40, 40, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        vit.forward_features(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="text_query"):
        _tiny("bus").forward_features(torch.randn(1, 3, 40, 40, dtype=torch.float64), torch.randn(1, 7).double())


@pytest.mark.parametrize("ratios", [(0.0, 0.5), (0.5, 1.2), (-0.1, 0.5)])
def test_keep_ratio_out_of_range_raises(ratios):
    from bus_model import BusConfig

    with pytest.raises(ValueError, match=r"keep_ratios must each be in \(0, 1\]"):
        BusConfig(selection=SelectionConfig(policy="bus", layers=(3, 6), keep_ratios=ratios)).validate()
