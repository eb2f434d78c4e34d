"""The random (FLIP) and tome (ToMe) policies inside BusViT, against references written here; the
policy registry; bad selection configs."""

import pytest
import torch
import torch.nn.functional as F

import bus_model
from bus_kernels.reference import token_merge as tome_ref
from bus_model import BusConfig, BusViT, SelectionConfig, VisionConfig
from bus_model.selection import POLICIES, POLICY_INFO, keep_rule, policy_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vit(policy, impl="sdpa", **sel):
    vision = VisionConfig(image_size=56, patch_size=8, width=48, depth=5, num_heads=3, mlp_ratio=2.0)
    sel.setdefault("layers", (1, 3))
    sel.setdefault("keep_ratios", (0.6, 0.5))
    return BusViT(vision, SelectionConfig(policy=policy, **sel), attn_impl=impl, kernel_backend="torch").double()


def test_registry_lists_every_policy():
    assert set(policy_names()) == {"bus", "elip", "evit", "random", "tome", "none"} == set(POLICIES)
    assert bus_model.config.POLICIES == POLICIES
    assert POLICY_INFO["elip"].text_free == "none" and POLICY_INFO["bus"].text_free == "evit"
    for name in POLICIES:  # every policy builds and runs on the CPU config
        bus_model.get_config("bus-small", selection__policy=name)


def test_random_keeps_a_seeded_uniform_subset_at_the_patch_embedding():
    vit = _vit("random", layers=(0,), keep_ratios=(0.5,)).train()
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    torch.manual_seed(11)
    out = vit.forward_features(images)
    torch.manual_seed(11)
    expected = torch.rand(2, 49).topk(24, dim=1).indices.sort(1).values  # the same draw, top 24 = round(0.5 * 49)
    (rec,) = out.selections
    assert rec.layer == 0 and torch.equal(rec.kept_positions, expected)
    assert out.tokens.shape == (2, 1 + 24, 48)  # no fused token: FLIP drops
    # the kept tokens are exactly the embedded patches at those positions, then the blocks run on them
    with torch.no_grad():
        x = vit.patch_embed(images)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), x], 1) + vit.pos_embed
        x = torch.cat([x[:, :1], x[:, 1:].gather(1, expected[..., None].expand(-1, -1, 48))], 1)
        for blk in vit.blocks:
            x, _, _ = blk.attend(x, None, "sdpa")
            x = blk.feed_forward(x)
        torch.testing.assert_close(out.tokens, vit.norm(x))
    again = vit.forward_features(images)  # a fresh draw per step
    assert not torch.equal(again.selections[0].kept_positions, rec.kept_positions)


def test_random_drops_nothing_at_eval_unless_asked():
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    vit = _vit("random").eval()
    with torch.no_grad():
        out = vit.forward_features(images)
        torch.testing.assert_close(out.tokens, vit.forward_features(images, policy="none").tokens)
        assert out.selections == []
        asked = _vit("random", random_at_eval=True).eval().forward_features(images)
    assert [r.num_kept[0].item() for r in asked.selections] == [29, 14]  # round(0.6 * 49), round(0.5 * 29)


def _tome_reference(vit, images, r_per_layer):
    """Float64 ToMe forward: proportional attention (scores + log size) in every block, matching on the
    keys averaged over heads after the attention of the configured blocks, size-weighted merge
    (the merge itself from the loop-per-row twin)."""
    C, H = vit.vision_config.width, vit.vision_config.num_heads
    D = C // H
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1) + vit.pos_embed
    size = torch.ones(x.shape[:2], dtype=torch.float64)
    pos = torch.arange(vit.num_patches).expand(x.shape[0], -1)
    kept = []
    for i, blk in enumerate(vit.blocks):
        B, N, _ = x.shape
        q, k, v = F.linear(blk.norm1(x), blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) * D**-0.5 + size.log()[:, None, None, :]).softmax(-1)
        x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        if i in vit.selection.layers:
            r = r_per_layer[vit.selection.layers.index(i)]
            plan = tome_ref.bipartite_soft_matching(k.mean(1), r, num_protected=1)
            x, size = tome_ref.merge_tokens(x, plan, size)
            size = size.double()
            pos = pos.gather(1, plan.keep[:, 1:] - 1)
            kept.append(pos)
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    return vit.norm(x), kept, size


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_tome_matches_float64_reference(impl):
    torch.manual_seed(7)
    vit = _vit("tome", impl).eval()
    images = torch.randn(3, 3, 56, 56, dtype=torch.float64, requires_grad=True)
    out = vit.forward_features(images)
    with torch.no_grad():
        ref, kept, size = _tome_reference(vit, images, [49 - 29, 29 - 14])  # down to round(0.6*49), round(0.5*29)
    assert out.tokens.shape == ref.shape == (3, 1 + 14, 48)
    torch.testing.assert_close(out.tokens, ref, rtol=1e-6, atol=1e-7)
    assert [torch.equal(rec.kept_positions, k) for rec, k in zip(out.selections, kept)] == [True, True]
    torch.testing.assert_close(out.sizes.double(), size)
    assert (out.sizes.sum(1) == 50).all()  # [CLS] + 49 patches, each counted once
    out.tokens.sum().backward()
    assert torch.isfinite(images.grad).all()


def test_tome_fixed_r():
    vit = _vit("tome", layers=(0, 1, 2), keep_ratios=(1.0, 1.0, 1.0), tome_r=8).eval()
    with torch.no_grad():
        out = vit.forward_features(torch.randn(1, 3, 56, 56, dtype=torch.float64))
    assert [r.num_kept.item() for r in out.selections] == [41, 33, 25]


@pytest.mark.parametrize(
    "selection, field",
    [
        ({"policy": "flip"}, "selection.policy"),
        ({"policy": "elip", "layers": (2, 4), "keep_ratios": (0.9,)}, "keep_ratios"),
        ({"policy": "elip", "layers": (2, 4), "keep_ratios": (0.9, 0.5), "lookahead": (2,)}, "selection.lookahead"),
        ({"policy": "elip", "layers": (2, 10), "keep_ratios": (0.9, 0.5), "lookahead": (2, 3)}, "selection.lookahead"),
        ({"policy": "tome", "layers": (3,), "keep_ratios": (0.3,)}, "selection.keep_ratios"),
        ({"policy": "tome", "layers": (3, 6), "keep_ratios": (0.5, 0.5), "tome_r": 99}, "selection.tome_r"),
        ({"policy": "tome", "tome_r": -1}, "selection.tome_r"),
        ({"policy": "random", "keep_mode": "mass"}, "selection.keep_mode"),
        ({"text_free": "drop"}, "selection.text_free"),
        ({"keep_rounding": "ceil"}, "selection.keep_rounding"),
        ({"ratio_of": "all"}, "selection.ratio_of"),
    ],
)
def test_bad_selection_names_the_field(selection, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        BusConfig(selection=SelectionConfig(**selection)).validate()


@pytest.mark.parametrize(
    "policy, overrides, counts",
    [
        ("elip", {}, [57, 41]),  # "auto": int(64 * 0.9), int(64 * 0.65) of the original patches, as ELIP's code
        ("elip", {"ratio_of": "original", "keep_rounding": "floor"}, [57, 41]),  # what the shipped elip-* set
        ("elip", {"ratio_of": "current", "keep_rounding": "round"}, [58, 38]),  # round(0.9 * 64), round(0.65 * 58)
        ("bus", {}, [58, 38]),  # "auto" for every other policy: today's current + round
    ],
)
def test_hand_built_selection_keeps_the_policys_own_count(policy, overrides, counts):
    """Issue 25: SelectionConfig(policy="elip") alone keeps 57 of 64 patches at 0.9 (it kept 58)."""
    vision = VisionConfig(image_size=64, patch_size=8, width=48, depth=4, num_heads=3, mlp_ratio=2.0)  # 64 patches
    selection = SelectionConfig(policy=policy, layers=(1, 3), keep_ratios=(0.9, 0.65), **overrides)
    vit = BusViT(vision, selection, text_width=48, kernel_backend="torch").double().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = vit.forward_features(torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randn(2, 48, dtype=torch.float64))
    assert [r.num_kept.tolist() for r in out.selections] == [[c, c] for c in counts]
    config = BusConfig(vision=vision, selection=selection)
    assert BusConfig.from_dict(config.to_dict()) == config  # "auto" survives the JSON round trip


def test_keep_rule_resolves_auto_per_policy():
    assert SelectionConfig().ratio_of == SelectionConfig().keep_rounding == "auto"
    assert keep_rule("elip", "auto", "auto") == ("original", "floor")
    assert keep_rule("elip", "current", "auto") == ("current", "floor")
    for name in POLICIES:
        if name != "elip":
            assert keep_rule(name, "auto", "auto") == ("current", "round")
    with pytest.raises(ValueError, match=r"selection\.keep_rounding"):
        keep_rule("bus", "auto", "ceil")
    with pytest.raises(ValueError, match="resolve 'auto' with keep_rule"):
        bus_model.selection.keep_count(0.5, 10, 10, "auto", "auto")
