"""bus_kernels.patch.timm: drop-in token pruning on timm VisionTransformer (random init, no download).

The pruned features are checked against an independent float64 re-implementation that runs timm's
original blocks one by one and selects/fuses tokens with plain PyTorch.
"""

import contextlib
import copy
import functools
import math

import pytest
import torch

timm = pytest.importorskip("timm")

import bus_kernels.patch as patch  # noqa: E402

IMG = 48  # 3 x 3 patches of 16 px: tiny but enough tokens to prune


@functools.lru_cache(maxsize=None)
def _prototype(img_size, options):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **dict(options)).eval()


def make_vit(img_size=IMG, **kwargs):
    """A fresh random-init vit_tiny (a copy of a cached one: timm's init costs seconds on a busy CPU)."""
    return copy.deepcopy(_prototype(img_size, tuple(sorted(kwargs.items()))))


def images(batch=3, img_size=IMG, seed=1):
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def expected_keep(keep, n):
    """The documented rule: round-half-up(keep * n), clamped to [1, n]."""
    return min(n, max(1, int(math.floor(keep * n + 0.5))))


def record_lengths(model):
    """Token count entering each block on the next forward (a list filled by pre-hooks)."""
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1])) for b in model.blocks]
    return lengths, hooks


def reference_features(model, x, layers, keep, fuse, text_query=None):
    """float64 forward_features with pruning, written independently of bus_kernels."""
    model = model.double()
    P = model.num_prefix_tokens
    h = model.norm_pre(model._pos_embed(model.patch_embed(x.double())))
    for index, block in enumerate(model.blocks):
        attn = block.attn
        B, N, C = h.shape
        H, D = attn.num_heads, attn.head_dim
        qkv = attn.qkv(block.norm1(h)).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        h = block(h)
        if index not in layers:
            continue
        if text_query is None:
            query = q[:, :, 0]  # (B, H, D)
        else:
            w, b = attn.qkv.weight[: H * D], attn.qkv.bias[: H * D]
            query = attn.q_norm((text_query.double() @ w.T + b).view(B, H, D))
        logits = torch.einsum("bhd,bhnd->bhn", query, k[:, :, P:]) * D**-0.5
        scores = logits.softmax(-1).mean(1)  # (B, n)
        n = N - P
        kk = expected_keep(keep, n)
        if kk == n:
            continue
        top = scores.topk(kk, dim=1).indices.sort(dim=1).values  # kept positions, ascending
        patches = h[:, P:]
        kept = torch.gather(patches, 1, top[:, :, None].expand(-1, -1, C))
        parts = [h[:, :P], kept]
        if fuse:
            dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
            w_drop = scores * dropped
            fused = (w_drop[:, :, None] * patches).sum(1) / w_drop.sum(1, keepdim=True)
            parts.append(fused[:, None])
        h = torch.cat(parts, dim=1)
    return model.norm(h)


@pytest.mark.parametrize("policy", ["evit", "text"])
def test_keep_one_equals_unpatched_vit_tiny_224(policy):
    model = make_vit(img_size=224)
    x = images(batch=2, img_size=224)
    with torch.no_grad():
        ref = model(x)
        patch.timm(model, layers=[0, 3, 6, 9, 11], keep=1.0, policy=policy)
        with patch.text_guidance(model, torch.randn(2, 192)) if policy == "text" else contextlib.nullcontext():
            out = model(x)
    assert torch.equal(out, ref)


def test_no_layers_equals_unpatched():
    model = make_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        out = patch.timm(model, layers=[], keep=0.5)(x)
    assert torch.equal(out, ref)


def test_keep_one_equals_unpatched_in_training_with_drop_path_and_layerscale():
    model = make_vit(drop_path_rate=0.3, init_values=0.1, qk_norm=True).train()
    x = images()
    torch.manual_seed(5)
    ref = model(x)
    patch.timm(model, layers=[2, 7], keep=1.0)
    torch.manual_seed(5)
    out = model(x)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "variant, layers, keep, fuse, policy",
    [
        (dict(), [1, 4, 8], 0.7, True, "evit"),
        (dict(qk_norm=True, init_values=0.5, reg_tokens=2), [0, 5], 0.45, False, "evit"),
        (dict(class_token=False, global_pool="avg", reg_tokens=1), [3, 10], 0.6, True, "text"),
    ],
)
def test_pruned_features_match_float64_reference(variant, layers, keep, fuse, policy):
    img = 80  # 5 x 5 patches
    model = make_vit(img_size=img, **variant)
    x = images(batch=3, img_size=img, seed=7)
    text_query = torch.randn(3, 192, generator=torch.Generator().manual_seed(8)) if policy == "text" else None
    with torch.no_grad():
        expected = reference_features(model, x, layers, keep, fuse, text_query)
        patch.timm(model, layers=layers, keep=keep, fuse=fuse, policy=policy, backend="torch")
        if text_query is None:
            out = model.forward_features(x.double())
        else:
            with patch.text_guidance(model, text_query.double()):
                out = model.forward_features(x.double())
    assert out.shape == expected.shape
    # text_patch_scores returns float32 scores (the fused weights): float32-level agreement
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("keep, fuse", [(0.7, True), ([0.5, 0.31, 0.9], False)])
def test_token_count_per_layer_as_documented(keep, fuse):
    model = make_vit(img_size=112, reg_tokens=3)  # 7 x 7 = 49 patches, 1 + 3 prefix tokens
    layers = [2, 5, 9]
    patch.timm(model, layers=layers, keep=keep, fuse=fuse)
    lengths, hooks = record_lengths(model)
    with torch.no_grad():
        out = model.forward_features(images(batch=2, img_size=112))
    keeps = keep if isinstance(keep, list) else [keep] * 3
    P, n, expected = 4, 49, []
    for index in range(12):
        expected.append(P + n)
        if index in layers:
            n = expected_keep(keeps[layers.index(index)], n) + fuse
    assert lengths == expected
    assert out.shape == (2, P + n, 192)
    kept = patch.kept_patches(model)
    assert sorted(kept) == layers
    assert kept[9].shape == (2, n)
    for hook in hooks:
        hook.remove()


def test_prefix_tokens_are_always_kept():
    model = make_vit(img_size=80, reg_tokens=2)
    x = images(img_size=80)
    with torch.no_grad():
        reference = model.blocks[:4](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        patch.timm(model, layers=[3], keep=0.2)
        pruned = model.blocks[:4](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    assert pruned.shape[1] == 3 + expected_keep(0.2, 25) + 1
    assert torch.equal(pruned[:, :3], reference[:, :3])


def test_text_policy_different_captions_select_different_tokens():
    model = make_vit(img_size=96)  # 36 patches
    patch.timm(model, layers=[2], keep=0.25, policy="text")
    x = images(batch=1, img_size=96).expand(4, -1, -1, -1)  # one image, four captions
    captions = torch.randn(4, 192, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad(), patch.text_guidance(model, captions):
        out = model.forward_features(x)
    kept = patch.kept_patches(model)[2]  # (4, 9 + 1)
    assert len({tuple(row.tolist()) for row in kept}) > 1
    assert not torch.allclose(out[0], out[1])
    # the same caption twice selects the same patches
    with torch.no_grad(), patch.text_guidance(model, captions[:1].expand(4, -1)):
        model.forward_features(x)
    again = patch.kept_patches(model)[2]
    assert (again == again[0]).all()


def test_unpatch_restores_exact_behaviour():
    model = make_vit()
    x = images()
    classes = [type(b) for b in model.blocks]
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        patch.timm(model, layers=[1, 2, 3], keep=0.5)
        assert model(x).shape == ref.shape  # head pools the [CLS]
        assert type(model.blocks[1]) is not classes[1] and isinstance(model.blocks[1], classes[1])
        assert list(model.state_dict()) == keys
        assert patch.unpatch(model) is model
        out = model(x)
    assert torch.equal(out, ref)
    assert [type(b) for b in model.blocks] == classes
    for block in model.blocks:
        assert not [name for name in vars(block) if name.startswith("_bus")]
        assert not block.attn.q_norm._forward_hooks and not block.attn.k_norm._forward_hooks
    assert not [name for name in vars(model) if name.startswith("_bus")]
    assert patch.unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_deepcopy_of_patched_model_is_independent():
    """EMA copies and the like: the copy prunes on its own; unpatching it leaves the original patched."""
    model = patch.timm(make_vit(img_size=64, depth=4), layers=[1, 2], keep=0.5)
    x = images(batch=2, img_size=64)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
        assert patch.kept_patches(twin)[2].shape == (2, expected_keep(0.5, expected_keep(0.5, 16) + 1) + 1)
        patch.unpatch(twin)
        assert type(twin.blocks[1]) is type(twin.blocks[0])
        assert model.blocks[1].attn.k_norm._forward_hooks and not twin.blocks[1].attn.k_norm._forward_hooks
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_repatch_replaces_previous_patch():
    model = make_vit(img_size=96)
    patch.timm(model, layers=[1, 2], keep=0.5)
    patch.timm(model, layers=[4], keep=0.5)
    lengths, hooks = record_lengths(model)
    with torch.no_grad():
        model(images(img_size=96))
    assert lengths == [37] * 5 + [1 + 18 + 1] * 7
    assert type(model.blocks[1]) is type(model.blocks[0])
    for hook in hooks:
        hook.remove()


def test_gradients_flow_through_patched_model():
    model = make_vit(img_size=64).train()
    patch.timm(model, layers=[1, 3], keep=0.5, policy="text")
    text_query = torch.randn(2, 192, requires_grad=True)
    with patch.text_guidance(model, text_query):
        loss = model(images(batch=2, img_size=64)).square().mean()
    loss.backward()
    assert text_query.grad is not None and text_query.grad.abs().sum() > 0  # through the fused token weights
    for name, param in model.named_parameters():
        if name.startswith("blocks.11.") or name == "patch_embed.proj.weight" or name.startswith("blocks.1.attn.qkv"):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("policy", ["evit", "text"])
def test_torch_compile_fullgraph(policy):
    model = make_vit(img_size=64, depth=4)
    patch.timm(model, layers=[1, 2], keep=0.6, policy=policy)
    x = images(batch=2, img_size=64)
    text_query = torch.randn(2, 192)
    guidance = patch.text_guidance(model, text_query) if policy == "text" else contextlib.nullcontext()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with guidance, torch.no_grad():
        expected = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, expected)
    n = expected_keep(0.6, expected_keep(0.6, 16) + 1)  # 4 x 4 patches, pruned twice
    assert patch.kept_patches(model)[2].shape == (2, n + 1)


def test_bad_arguments_raise_clear_errors():
    model = make_vit(depth=4)
    with pytest.raises(ValueError, match="layers: index 4 is out of range"):
        patch.timm(model, layers=[1, 4], keep=0.5)
    with pytest.raises(ValueError, match="layers: index -1"):
        patch.timm(model, layers=[-1], keep=0.5)
    with pytest.raises(ValueError, match="must not repeat"):
        patch.timm(model, layers=[1, 1], keep=0.5)
    with pytest.raises(TypeError, match="layers must hold ints"):
        patch.timm(model, layers=[1.0], keep=0.5)
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
            patch.timm(model, layers=[1], keep=keep)
    with pytest.raises(ValueError, match="keep has 1 ratios but layers has 2"):
        patch.timm(model, layers=[1, 2], keep=[0.5])
    with pytest.raises(TypeError, match="keep must be a float"):
        patch.timm(model, layers=[1], keep="0.5")
    with pytest.raises(ValueError, match="policy must be one of"):
        patch.timm(model, layers=[1], keep=0.5, policy="elip")
    with pytest.raises(ValueError, match=r"keep must be >= 0.5 with policy='tome'"):
        patch.timm(model, layers=[1, 2], keep=[0.6, 0.4], policy="tome")
    with pytest.raises(TypeError, match="fuse must be a bool"):
        patch.timm(model, layers=[1], keep=0.5, fuse=1)
    with pytest.raises(TypeError, match="must be a timm VisionTransformer"):
        patch.timm(torch.nn.Linear(3, 3), layers=[0], keep=0.5)
    with pytest.raises(TypeError, match="must be a timm VisionTransformer"):
        patch.timm(timm.create_model("resnet10t", pretrained=False), layers=[0], keep=0.5)
    no_cls = make_vit(depth=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        patch.timm(no_cls, layers=[0], keep=0.5)
    assert not [name for name in vars(model) if name.startswith("_bus")]  # failed patches left no trace


def test_text_policy_errors():
    model = make_vit(img_size=64, depth=3)
    x = images(batch=2, img_size=64)
    with pytest.raises(ValueError, match="is not patched"):
        with patch.text_guidance(model, torch.randn(2, 192)):
            pass
    patch.timm(model, layers=[1], keep=0.5, policy="text")
    with pytest.raises(ValueError, match="needs a caption embedding"):
        model(x)
    with pytest.raises(ValueError, match="text_query has size 100 in dim 1"):
        with patch.text_guidance(model, torch.randn(2, 100)):
            pass
    with pytest.raises(ValueError, match=r"text_query must have shape \(B, C\)"):
        with patch.text_guidance(model, torch.randn(192)):
            pass
    with pytest.raises(TypeError, match="text_query must have a floating dtype"):
        with patch.text_guidance(model, torch.ones(2, 192, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="text_query has batch size 3 but the images have 2"):
        with patch.text_guidance(model, torch.randn(3, 192)):
            model(x)
    with pytest.raises(ValueError, match="attn_mask cannot survive token pruning"):
        model.forward_features(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    patch.timm(model, layers=[1], keep=0.5, policy="evit")
    with pytest.raises(ValueError, match="policy='text'; this one uses 'evit'"):
        with patch.text_guidance(model, torch.randn(2, 192)):
            pass



def test_gradient_checkpointing_and_kept_patches():
    """Checkpointing re-runs blocks out of order in backward; outputs, grads and kept_patches stay right."""
    x = images(batch=2, img_size=96)
    results = []
    for checkpointing in (False, True):
        model = make_vit(img_size=96).train()
        patch.timm(model, layers=[1, 4, 7], keep=[0.5, 0.6, 1.0])
        model.set_grad_checkpointing(checkpointing)
        out = model(x)
        out.square().mean().backward()
        results.append((out, model.blocks[0].attn.qkv.weight.grad, patch.kept_patches(model)))
    (out0, grad0, kept0), (out1, grad1, kept1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grad1, grad0)
    assert kept0.keys() == kept1.keys() == {1, 4, 7}
    for layer in kept0:
        assert torch.equal(kept0[layer], kept1[layer])
    n1 = expected_keep(0.5, 36)
    assert kept0[1].shape == (2, n1 + 1) and kept0[7].shape == kept0[4].shape
    assert (kept0[1][:, -1] == -1).all() and (kept0[1][:, :-1] >= 0).all()
    # layer 4's positions are a subset of layer 1's (fused tokens aside), ascending within the kept ones
    for row1, row4 in zip(kept0[1].tolist(), kept0[4].tolist()):
        assert set(row4) <= set(row1)
        real = [p for p in row4 if p >= 0]
        assert real == sorted(real)
