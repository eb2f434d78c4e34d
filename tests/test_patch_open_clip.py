"""bus_kernels.patch.open_clip: token pruning on open_clip's vision tower (random init from configs, no download).

Pruned tokens are checked against an independent float64 re-implementation that runs open_clip's
blocks one by one and selects/fuses with plain PyTorch; the text policy against a planted caption.
"""

import contextlib
import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

import bus_kernels.patch as patch  # noqa: E402
from _patch_planted import expected_keep, planted_caption, planted_image, schedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, DEPTH, IMG, PATCH = 48, 5, 40, 8  # 5 x 5 patches, 3 heads of 16
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=1)


def make_clip(seed=0, **vision):
    torch.manual_seed(seed)
    cfg = dict(image_size=IMG, patch_size=PATCH, width=WIDTH, head_width=16, layers=DEPTH, mlp_ratio=2.0)
    cfg.update(vision)
    return open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TEXT).eval()


def make_timm_tower_clip(seed=0):
    """open_clip's TimmModel tower; its trunk swapped for a small timm ViT (TimmModel builds at 224 px)."""
    torch.manual_seed(seed)
    cfg = dict(image_size=IMG, timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear")
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TEXT)
    clip.visual.trunk = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=4, num_classes=0
    )
    return clip.eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def guidance(model, policy, batch, width=WIDTH):
    if policy != "text":
        return contextlib.nullcontext()
    return patch.text_guidance(model, torch.randn(batch, width, generator=torch.Generator().manual_seed(3)))


def record_lengths(blocks):
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1])) for b in blocks]
    return lengths, hooks


@pytest.mark.parametrize("policy", ["evit", "text"])
@pytest.mark.parametrize(
    "vision",
    [dict(), dict(qk_norm=True, ls_init_value=0.1), dict(pool_type="avg"),
     dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)],  # CoCa's attention pooler
)
def test_keep_one_equals_unpatched(policy, vision):
    model = make_clip(**vision)
    model.visual.output_tokens = True
    x = images()
    with torch.no_grad():
        ref_pooled, ref_tokens = model.visual(x)
        patch.open_clip(model, layers=list(range(DEPTH)), keep=1.0, policy=policy)
        with guidance(model, policy, 3):
            pooled, tokens = model.visual(x)
    assert torch.equal(pooled, ref_pooled) and torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("policy", ["evit", "text"])
def test_keep_one_equals_unpatched_timm_tower_in_training(policy):
    model = make_timm_tower_clip().train()
    x = images(batch=2)
    torch.manual_seed(4)
    ref = model.encode_image(x)
    patch.open_clip(model, layers=[0, 3], keep=1.0, policy=policy)
    torch.manual_seed(4)
    with guidance(model, policy, 2, width=192):
        out = model.encode_image(x)
    assert torch.equal(out, ref)


def reference_tokens(visual, x, layers, keep, fuse, text_query=None):
    """float64 transformer output (B, 1 + n', C) with pruning, written independently of bus_kernels."""
    visual = visual.double()
    h = visual._embeds(x.double())
    for index, block in enumerate(visual.transformer.resblocks):
        mha = block.attn
        B, N, C = h.shape
        H = mha.num_heads
        D = C // H
        w, b = mha.in_proj_weight, mha.in_proj_bias
        normed = block.ln_1(h)
        k = (normed @ w[C : 2 * C].T + b[C : 2 * C]).view(B, N, H, D)
        source = normed[:, 0] if text_query is None else text_query.double()
        query = (source @ w[:C].T + b[:C]).view(B, H, D)
        h = block(h)
        if index not in layers:
            continue
        scores = (torch.einsum("bhd,bnhd->bhn", query, k[:, 1:]) * D**-0.5).softmax(-1).mean(1)  # (B, n)
        n = N - 1
        kk = expected_keep(keep, n)
        if kk == n:
            continue
        top = scores.topk(kk, dim=1).indices.sort(dim=1).values
        patches = h[:, 1:]
        parts = [h[:, :1], torch.gather(patches, 1, top[:, :, None].expand(-1, -1, C))]
        if fuse:
            weight = scores * torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
            parts.append(((weight[:, :, None] * patches).sum(1) / weight.sum(1, keepdim=True))[:, None])
        h = torch.cat(parts, dim=1)
    return h


@pytest.mark.parametrize(
    "layers, keep, fuse, policy", [([1, 3], 0.6, True, "evit"), ([0, 2, 4], 0.45, False, "text"), ([2], 0.3, True, "text")]
)
def test_pruned_tokens_match_float64_reference(layers, keep, fuse, policy):
    model = make_clip(seed=2)
    x = images(seed=5)
    text_query = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(6)) if policy == "text" else None
    with torch.no_grad():
        expected = reference_tokens(copy.deepcopy(model.visual), x, layers, keep, fuse, text_query)
        patch.open_clip(model, layers=layers, keep=keep, fuse=fuse, policy=policy, backend="torch")
        visual = model.visual.double()
        with patch.text_guidance(model, text_query.double()) if text_query is not None else contextlib.nullcontext():
            out = visual.transformer(visual._embeds(x.double()))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)  # float32 scores weight the fused token


@pytest.mark.parametrize("keep, fuse", [(0.7, True), ([0.5, 0.31, 0.9], False)])
def test_token_count_per_layer_and_output_tokens(keep, fuse):
    model = make_clip(output_tokens=True)
    layers = [0, 2, 3]
    patch.open_clip(model.visual, layers=layers, keep=keep, fuse=fuse)
    lengths, hooks = record_lengths(model.visual.transformer.resblocks)
    with torch.no_grad():
        pooled, tokens = model.visual(images(batch=2))
    expected = schedule(25, 1, DEPTH, layers, keep, fuse)
    assert lengths == expected
    last = expected[-1] - 1
    assert pooled.shape == (2, 32) and tokens.shape == (2, last, WIDTH)
    assert patch.kept_patches(model.visual)[3].shape == (2, last)
    for hook in hooks:
        hook.remove()


def test_attentional_pooler_pools_the_kept_tokens():
    """CoCa's attention pooler: its queries attend over the pruned tokens; output shapes unchanged."""
    model = make_clip(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, output_tokens=True)
    x = images(batch=2)
    with torch.no_grad():
        ref_pooled, ref_tokens = model.visual(x)
        patch.open_clip(model, layers=[1, 3], keep=0.4)
        seen = []
        hook = model.visual.attn_pool.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
        pooled, tokens = model.visual(x)
        hook.remove()
    assert seen == [schedule(25, 1, DEPTH + 1, [1, 3], 0.4)[-1]]
    assert pooled.shape == ref_pooled.shape and tokens.shape == ref_tokens.shape


def test_timm_tower_token_count_and_unpatch():
    model = make_timm_tower_clip()
    x = images(batch=2)
    with torch.no_grad():
        ref = model.encode_image(x)
        patch.open_clip(model, layers=[1, 2], keep=0.5, policy="evit")
        lengths, hooks = record_lengths(model.visual.trunk.blocks)
        out = model.encode_image(x)
        assert lengths == schedule(25, 1, 4, [1, 2], 0.5)
        assert out.shape == ref.shape
        assert patch.kept_patches(model)[2].shape == patch.kept_patches(model.visual)[2].shape
        patch.unpatch(model)
        assert torch.equal(model.encode_image(x), ref)
    assert not [m for m in model.modules() if any(name.startswith("_bus") for name in vars(m))]
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("block", ["default", "custom"])
def test_text_policy_keeps_the_planted_object(block):
    """The caption points at the object's patches: exactly those are kept."""
    model = make_clip(seed=3, **({} if block == "default" else dict(scale_fc=True)))
    visual = model.visual
    with torch.no_grad():
        visual.positional_embedding.zero_()  # no positions: object tokens stay identical to each other
    objects = [1, 7, 8, 13, 19, 23]
    x = planted_image(5, PATCH, objects)
    layer = 2
    captured = {}
    hook = visual.transformer.resblocks[layer].register_forward_pre_hook(lambda _m, a: captured.update(h=a[0]))
    with torch.no_grad():
        visual(x)
    hook.remove()
    attn = visual.transformer.resblocks[layer].attn
    w, b = attn.in_proj_weight, attn.in_proj_bias
    keys = visual.transformer.resblocks[layer].ln_1(captured["h"])[0] @ w[WIDTH : 2 * WIDTH].T + b[WIDTH : 2 * WIDTH]
    caption = planted_caption(w[:WIDTH], b[:WIDTH], keys[1 + objects[0]], keys[1 + 0])  # cell 0 is background
    patch.open_clip(model, layers=[layer], keep=len(objects) / 25, policy="text")
    with torch.no_grad(), patch.text_guidance(model, caption[None].expand(2, -1)):
        model.encode_image(x.expand(2, -1, -1, -1))
    kept = patch.kept_patches(model)[layer]  # (2, 6 + 1)
    assert kept[:, :-1].tolist() == [objects, objects] and (kept[:, -1] == -1).all()


def test_patch_dropout_in_training_prunes_the_remaining_tokens():
    model = make_clip(patch_dropout=0.4).train()
    patch.open_clip(model, layers=[1, 3], keep=0.5)
    lengths, hooks = record_lengths(model.visual.transformer.resblocks)
    model.encode_image(images(batch=2))
    remaining = max(1, int(25 * (1 - 0.4)))  # PatchDropout keeps int(n * (1 - p)) patches
    assert lengths == schedule(remaining, 1, DEPTH, [1, 3], 0.5)
    model.eval()
    lengths.clear()
    with torch.no_grad():
        model.encode_image(images(batch=2))  # no patch dropout at eval
    assert lengths == schedule(25, 1, DEPTH, [1, 3], 0.5)
    for hook in hooks:
        hook.remove()


def test_gradient_checkpointing_matches_and_gradients_flow():
    x = images(batch=2)
    results = []
    for checkpointing in (False, True):
        model = make_clip(seed=5).train()
        patch.open_clip(model, layers=[1, 3], keep=[0.5, 0.7], policy="text")
        model.set_grad_checkpointing(checkpointing)
        text = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(2)).requires_grad_()
        with patch.text_guidance(model, text):
            out = model.encode_image(x)
        out.square().sum().backward()
        results.append((out, model.visual.transformer.resblocks[0].attn.in_proj_weight.grad, text.grad,
                        patch.kept_patches(model)))
    (out0, grad0, text0, kept0), (out1, grad1, text1, kept1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grad1, grad0)
    torch.testing.assert_close(text1, text0)
    assert text0.abs().sum() > 0  # the caption gets gradients through the fused token's weights
    assert all(torch.equal(kept0[layer], kept1[layer]) for layer in (1, 3))


def test_unpatch_restores_exact_behaviour_and_text_tower_untouched():
    model = make_clip()
    x, text = images(), torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    blocks = model.visual.transformer.resblocks
    classes = [type(b) for b in blocks]
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(x), model.encode_text(text)
        patch.open_clip(model, layers=[0, 2], keep=0.4)
        assert type(blocks[0]) is not classes[0] and isinstance(blocks[0], classes[0])
        assert all(type(b) is classes[1] for b in model.transformer.resblocks)  # the text tower's blocks
        assert torch.equal(model.encode_text(text), ref_text)  # its causal attn_mask still works
        patch.unpatch(model.visual)  # unpatching the tower unpatches the model too
        out = model.encode_image(x)
    assert torch.equal(out, ref_image)
    assert [type(b) for b in blocks] == classes
    assert not [m for m in model.modules() if any(name.startswith("_bus") for name in vars(m))]
    assert not any(b.attn._forward_pre_hooks for b in blocks)


def test_caption_query_from_the_model_text_tower():
    model = make_clip()
    text = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.encode_text(text)  # (2, 32)
        query = patch.caption_query(model, features)
        torch.testing.assert_close(query, features @ model.visual.proj.T)
        assert query.shape == (2, WIDTH)
        patch.open_clip(model, layers=[1], keep=0.5, policy="text")
        with patch.text_guidance(model, query):
            assert model.encode_image(images(batch=2)).shape == (2, 32)
    with pytest.raises(ValueError, match="text_features has width 7, expected the model's embedding width 32"):
        patch.caption_query(model, torch.randn(2, 7))
    with pytest.raises(TypeError, match="model must be an open_clip CLIP"):
        patch.caption_query(torch.nn.Linear(2, 2), torch.randn(2, 2))
    tower = make_timm_tower_clip()
    torch.testing.assert_close(patch.caption_query(tower, features), features @ tower.visual.head.proj.weight)


def test_bad_arguments_raise_clear_errors():
    model = make_clip()
    with pytest.raises(TypeError, match="must be an open_clip CLIP / CustomTextCLIP / CoCa"):
        patch.open_clip(torch.nn.Linear(3, 3), layers=[0], keep=0.5)
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=16, image_size=64), text_cfg=TEXT)
    with pytest.raises(TypeError, match="must be an open_clip CLIP .* got CLIP"):
        patch.open_clip(resnet, layers=[0], keep=0.5)  # ModifiedResNet tower
    with pytest.raises(ValueError, match=f"layers: index {DEPTH} is out of range"):
        patch.open_clip(model, layers=[DEPTH], keep=0.5)
    for keep in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
            patch.open_clip(model, layers=[0], keep=keep)
    with pytest.raises(ValueError, match="policy must be one of"):
        patch.open_clip(model, layers=[0], keep=0.5, policy="mass")
    cosine = make_clip(scaled_cosine_attn=True)
    with pytest.raises(TypeError, match="block 1: scaled cosine attention is not supported"):
        patch.open_clip(cosine, layers=[1], keep=0.5)
    assert not [m for m in model.modules() if any(name.startswith("_bus") for name in vars(m))]
    patch.open_clip(model, layers=[1], keep=0.5, policy="text")
    x = images()
    with pytest.raises(ValueError, match="needs a caption embedding"):
        model.encode_image(x)
    with pytest.raises(ValueError, match=f"text_query has size 32 in dim 1 .* expected {WIDTH}"):
        with patch.text_guidance(model, torch.randn(3, 32)):
            pass
    with pytest.raises(ValueError, match="text_query has batch size 2 but the images have 3"):
        with patch.text_guidance(model, torch.randn(2, WIDTH)):
            model.encode_image(x)
    with pytest.raises(ValueError, match="attn_mask cannot survive token pruning"), patch.text_guidance(
        model, torch.randn(3, WIDTH)
    ):
        visual = model.visual
        visual.transformer(visual._embeds(x), attn_mask=torch.zeros(26, 26))
