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


def test_elip_keeps_ratios_of_original_count():
    torch.manual_seed(3)
    vit = _tiny("elip", text_width=48, layers=(1, 3), keep_ratios=(0.9, 0.4), ratio_of="original")
    assert vit.text_query_proj is None  # parameter-free
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    text = torch.randn(2, 48, dtype=torch.float64)
    out = vit.forward_features(images, text)
    assert [r.num_kept.tolist() for r in out.selections] == [[22, 22], [10, 10]]  # round(0.9*25), round(0.4*25)
    assert out.tokens.shape == (2, 1 + 10 + 1, 48)
    assert not any(r.scores.requires_grad for r in out.selections)  # look-ahead without gradients
    # reference for the first step: look ahead through block 1, score with block 2's fused query
    with torch.no_grad():
        C, H = 48, 3
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), x], 1) + vit.pos_embed
        for blk in vit.blocks[:2]:  # block 0 runs for real; block 1 is the look-ahead
            B, N, _ = x.shape
            qkv = F.linear(blk.norm1(x), blk.attn.qkv.weight, blk.attn.qkv.bias)
            q, k, v = qkv.view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, N, D)
            att = ((q @ k.transpose(-1, -2)) * (C // H) ** -0.5).softmax(-1)
            x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, N, C))
            x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        last = vit.blocks[2]
        keys = F.linear(last.norm1(x), last.attn.qkv.weight[C : 2 * C], last.attn.qkv.bias[C : 2 * C])[:, 1:]
        anchor = 0.8 * x[:, 0] + 0.2 * text
        query = F.linear(last.norm1(anchor), last.attn.qkv.weight[:C], last.attn.qkv.bias[:C])
        logits = torch.einsum("bhd,bnhd->bhn", query.view(2, H, -1), keys.view(2, 25, H, -1)) * (C // H) ** -0.5
        ref_scores = logits.softmax(-1).mean(1)
    torch.testing.assert_close(out.selections[0].scores.double(), ref_scores, rtol=1e-5, atol=1e-6)
    out.tokens.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


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
