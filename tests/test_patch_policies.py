"""The ``random`` (FLIP) and ``tome`` (ToMe) policies of the drop-in patches (timm, open_clip, HF).

ToMe is checked against an independent float64 loop-per-row re-implementation of bipartite soft
matching with size-weighted merging (sizes carried from one merging layer to the next), driven by
the keys of the unpatched blocks; FLIP against its definition (a uniformly random subset, training
only, reproducible under gradient checkpointing).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import bus_kernels.patch as patch  # noqa: E402
from _patch_planted import expected_keep, schedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG, PATCH = 40, 8  # 5 x 5 patches


def make(family, seed=0):
    torch.manual_seed(seed)
    if family == "timm":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=4)
        return model.eval(), list(model.blocks), lambda m, x: m.forward_features(x)
    if family == "open_clip":
        cfg = dict(image_size=IMG, patch_size=PATCH, width=48, head_width=16, layers=4, mlp_ratio=2.0)
        model = open_clip.CLIP(
            embed_dim=32, vision_cfg=cfg, text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
        ).visual
        return model.eval(), list(model.transformer.resblocks), lambda m, x: m.transformer(m._embeds(x))
    config = transformers.CLIPVisionConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=80, image_size=IMG, patch_size=PATCH
    )
    model = transformers.CLIPVisionModel(config)
    return model.eval(), list(model.encoder.layers), lambda m, x: m(pixel_values=x).last_hidden_state


def patch_fn(family):
    return {"timm": patch.timm, "open_clip": patch.open_clip, "hf_clip": patch.hf_vision}[family]


def images(batch=2, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def lengths_of(blocks, fn):
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1])) for b in blocks]
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


FAMILIES = ["timm", "open_clip", "hf_clip"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["random", "tome"])
def test_keep_one_equals_unpatched(family, policy):
    model, _, features = make(family)
    model.train()
    x = images()
    torch.manual_seed(3)
    ref = features(model, x)
    patch_fn(family)(model, layers=[0, 1, 2, 3], keep=1.0, policy=policy)
    torch.manual_seed(3)
    assert torch.equal(features(model, x), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_keeps_a_random_subset_in_training_only(family):
    model, blocks, features = make(family)
    x = images()
    with torch.no_grad():
        ref = features(model, x)
    patch_fn(family)(model, layers=[1, 2], keep=[0.6, 0.5], policy="random")  # fuse is ignored: FLIP drops
    model.train()
    kept = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        lengths = lengths_of(blocks, lambda: features(model, x))
        assert lengths == schedule(25, 1, 4, [1, 2], [0.6, 0.5], fuse=False)
        kept.append(patch.kept_patches(model))
    for positions in (kept[0][1], kept[0][2]):
        assert (positions >= 0).all()  # no fused token
        for row in positions.tolist():
            assert row == sorted(set(row))  # distinct, in order
    for row1, row2 in zip(kept[0][1].tolist(), kept[0][2].tolist()):
        assert set(row2) <= set(row1)  # layer 2 keeps some of what layer 1 kept
    assert not torch.equal(kept[0][1], kept[1][1])  # another draw, another subset
    assert not torch.equal(kept[0][1][0], kept[0][1][1])  # rows draw independently
    model.eval()
    with torch.no_grad():
        assert torch.equal(features(model, x), ref)  # inference sees every patch (FLIP, patch_dropout)


def test_random_is_reproduced_under_gradient_checkpointing():
    x = images()
    results = []
    for checkpointing in (False, True):
        model, _, _ = make("timm")
        model.train()
        patch.timm(model, layers=[1, 2], keep=0.5, policy="random")
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        out = model(x)
        out.square().mean().backward()
        results.append((out, model.blocks[0].attn.qkv.weight.grad, patch.kept_patches(model)[2]))
    (out0, grad0, kept0), (out1, grad1, kept1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grad1, grad0)  # the recomputation redrew the same subset
    assert torch.equal(kept0, kept1)


def tome_reference(patches, metric, sizes, r):
    """float64 ToMe step, one row at a time: (merged tokens, their sizes, surviving positions)."""
    tokens, new_sizes, positions = [], [], []
    for b in range(patches.shape[0]):
        n = patches.shape[1]
        m = F.normalize(metric[b], dim=-1)
        a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
        best, partner = (m[a_pos] @ m[b_pos].T).max(dim=1)
        strongest = sorted(range(len(a_pos)), key=lambda i: -best[i].item())[:r]  # stable, as documented
        into = {a_pos[i]: b_pos[partner[i].item()] for i in strongest}
        total = patches[b] * sizes[b][:, None]
        size = sizes[b].clone()
        for src, dst in into.items():
            total[dst] += patches[b, src] * sizes[b, src]
            size[dst] += sizes[b, src]
        keep = [j for j in range(n) if j not in into]
        tokens.append(total[keep] / size[keep][:, None])
        new_sizes.append(size[keep])
        positions.append(keep)
    return torch.stack(tokens), torch.stack(new_sizes), positions


def block_keys(family, block, h):
    """(B, N, D) keys of ``block`` on input ``h``, averaged over heads (ToMe's metric)."""
    if family == "timm":
        attn = block.attn
        B, N, C = h.shape
        qkv = attn.qkv(block.norm1(h)).view(B, N, 3, attn.num_heads, attn.head_dim)
        return attn.k_norm(qkv[:, :, 1].transpose(1, 2)).mean(1)
    mha = block.attn
    C, H = mha.embed_dim, mha.num_heads
    k = block.ln_1(h) @ mha.in_proj_weight[C : 2 * C].T + mha.in_proj_bias[C : 2 * C]
    return k.view(h.shape[0], h.shape[1], H, C // H).mean(2)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_tome_matches_float64_reference(family):
    model, blocks, features = make(family, seed=4)
    x = images(seed=5)
    layers, keep = [1, 2], [0.6, 0.7]
    with torch.no_grad():
        reference = copy.deepcopy(model).double()
        ref_blocks = list(reference.blocks) if family == "timm" else list(reference.transformer.resblocks)
        if family == "timm":
            h = reference.norm_pre(reference._pos_embed(reference.patch_embed(x.double())))
        else:
            h = reference._embeds(x.double())
        sizes = torch.ones(h.shape[0], h.shape[1] - 1, dtype=torch.float64)
        positions = None
        for index, block in enumerate(ref_blocks):
            metric = block_keys(family, block, h)
            h = block(h)
            if index in layers:
                n = h.shape[1] - 1
                r = n - expected_keep(keep[layers.index(index)], n)
                tokens, sizes, positions = tome_reference(h[:, 1:], metric[:, 1:], sizes, r)
                h = torch.cat([h[:, :1], tokens], dim=1)
        if family == "timm":
            h = reference.norm(h)
        patch_fn(family)(model, layers=layers, keep=keep, policy="tome")
        out = features(model.double(), x.double())
    assert out.shape == h.shape
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)  # merge averages run in float32 sizes
    first = patch.kept_patches(model)[1]
    assert [[first[b, j].item() for j in row] for b, row in enumerate(positions)] == patch.kept_patches(model)[2].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_token_counts(family):
    model, blocks, features = make(family)
    patch_fn(family)(model, layers=[0, 2, 3], keep=[0.5, 0.8, 0.55], policy="tome")
    with torch.no_grad():
        lengths = lengths_of(blocks, lambda: features(model, images()))
    assert lengths == schedule(25, 1, 4, [0, 2, 3], [0.5, 0.8, 0.55], fuse=False)
    assert patch.kept_patches(model)[3].shape[1] == schedule(25, 1, 5, [0, 2, 3], [0.5, 0.8, 0.55], fuse=False)[-1] - 1
