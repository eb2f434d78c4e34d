"""bus_kernels.patch.hf_vision on SigLIP and BLIP vision towers (random init from configs, no download).

SigLIP has no [CLS]: every token is scored, ``evit`` uses the mean query, the attention-pooling head
pools the kept tokens. BLIP has a [CLS] and a fused qkv projection. Pruned hidden states are checked
against an independent float64 re-implementation; the text policy against a planted caption.
"""

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bus_kernels.patch as patch  # noqa: E402
from _patch_planted import expected_keep, planted_caption, planted_image, schedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEADS, DEPTH, IMG, PATCH = 48, 3, 4, 40, 8  # 5 x 5 patches
D = WIDTH // HEADS
COMMON = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=80,
              image_size=IMG, patch_size=PATCH)
PREFIX = {"siglip": 0, "blip": 1}


def make_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**COMMON)).eval()
    # BLIP's default initializer_range is 1e-10 (near-zero weights: every score ties); 0.02 as CLIP's
    return transformers.BlipVisionModel(transformers.BlipVisionConfig(**COMMON, initializer_range=0.02)).eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def q_k(kind, layer, normed):
    """(q, k) (B, N, H, D) of ``layer`` from its normalised input, and the query projection (weight, bias)."""
    B, N, _ = normed.shape
    attn = layer.self_attn
    if kind == "siglip":
        w, b = attn.q_proj.weight, attn.q_proj.bias
        k = attn.k_proj(normed)
    else:
        w, b = attn.qkv.weight[:WIDTH], attn.qkv.bias[:WIDTH]
        k = normed @ attn.qkv.weight[WIDTH : 2 * WIDTH].T + attn.qkv.bias[WIDTH : 2 * WIDTH]
    q = normed @ w.T + b
    return q.view(B, N, HEADS, D), k.view(B, N, HEADS, D), (w, b)


def reference_hidden(model, kind, x, layers, keep, fuse, text_query=None):
    """float64 encoder output (before post_layernorm) with pruning, independent of bus_kernels."""
    model = model.double()
    P = PREFIX[kind]
    h = model.embeddings(x.double())
    for index, layer in enumerate(model.encoder.layers):
        q, k, (w, b) = q_k(kind, layer, layer.layer_norm1(h))
        if text_query is not None:
            query = (text_query.double() @ w.T + b).view(-1, HEADS, D)
        else:
            query = q[:, 0] if P else q.mean(1)  # SigLIP: the mean query
        h = layer(h, None) if kind == "siglip" else layer(h)
        h = h[0] if isinstance(h, tuple) else h
        if index not in layers:
            continue
        B, N, C = h.shape
        scores = (torch.einsum("bhd,bnhd->bhn", query, k[:, P:]) * D**-0.5).softmax(-1).mean(1)
        n = N - P
        kk = expected_keep(keep, n)
        if kk == n:
            continue
        top = scores.topk(kk, dim=1).indices.sort(dim=1).values
        patches = h[:, P:]
        parts = [h[:, :P], torch.gather(patches, 1, top[:, :, None].expand(-1, -1, C))]
        if fuse:
            weight = scores * torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
            parts.append(((weight[:, :, None] * patches).sum(1) / weight.sum(1, keepdim=True))[:, None])
        h = torch.cat(parts, dim=1)
    return h


@pytest.mark.parametrize("kind", ["siglip", "blip"])
@pytest.mark.parametrize("policy", ["evit", "text"])
def test_keep_one_equals_unpatched(kind, policy):
    model = make_model(kind)
    x = images()
    with torch.no_grad():
        ref = model(pixel_values=x)
        patch.hf_vision(model, layers=list(range(DEPTH)), keep=1.0, policy=policy)
        guidance = patch.text_guidance(model, torch.randn(3, WIDTH)) if policy == "text" else contextlib.nullcontext()
        with guidance:
            out = model(pixel_values=x)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)


@pytest.mark.parametrize(
    "kind, layers, keep, fuse, policy",
    [("siglip", [0, 2], 0.6, True, "evit"), ("siglip", [1], 0.3, False, "text"),
     ("blip", [1, 3], 0.45, True, "evit"), ("blip", [0, 2], 0.5, True, "text")],
)
def test_pruned_hidden_states_match_float64_reference(kind, layers, keep, fuse, policy):
    model = make_model(kind, seed=2)
    x = images(seed=4)
    text_query = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5)) if policy == "text" else None
    with torch.no_grad():
        expected = reference_hidden(model, kind, x, layers, keep, fuse, text_query)
        patch.hf_vision(model, layers=layers, keep=keep, fuse=fuse, policy=policy, backend="torch")
        with patch.text_guidance(model, text_query.double()) if text_query is not None else contextlib.nullcontext():
            out = model(pixel_values=x.double())
    hidden = model.post_layernorm(expected)
    assert out.last_hidden_state.shape == hidden.shape
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["siglip", "blip"])
def test_token_count_per_layer_and_pooling_of_kept_tokens(kind):
    model = make_model(kind)
    layers, keeps = [0, 1, 3], [0.5, 0.77, 0.2]
    patch.hf_vision(model, layers=layers, keep=keeps)
    lengths = []
    hooks = [l.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1])) for l in model.encoder.layers]
    with torch.no_grad():
        out = model(pixel_values=images(batch=2))
    expected = schedule(25, PREFIX[kind], DEPTH, layers, keeps)
    assert lengths == expected
    kept = schedule(25, PREFIX[kind], DEPTH + 1, layers, keeps)[-1]
    assert out.last_hidden_state.shape == (2, kept, WIDTH)
    assert patch.kept_patches(model)[3].shape == (2, kept - PREFIX[kind])
    with torch.no_grad():
        if kind == "siglip":  # the attention-pooling head saw the kept tokens
            torch.testing.assert_close(out.pooler_output, model.head(out.last_hidden_state), rtol=0, atol=0)
        else:
            torch.testing.assert_close(out.pooler_output, model.post_layernorm(out.last_hidden_state[:, 0]))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("kind", ["siglip", "blip"])
def test_text_policy_keeps_the_planted_object(kind):
    model = make_model(kind, seed=3)
    with torch.no_grad():
        position = model.embeddings.position_embedding
        (position.weight if isinstance(position, torch.nn.Embedding) else position).zero_()
    objects = [0, 6, 12, 17, 24]
    x = planted_image(5, PATCH, objects)
    index, P = 1, PREFIX[kind]
    captured = {}
    layer = model.encoder.layers[index]
    hook = layer.register_forward_pre_hook(lambda _m, a: captured.update(h=a[0]))
    with torch.no_grad():
        model(pixel_values=x)
        hook.remove()
        _, k, (w, b) = q_k(kind, layer, layer.layer_norm1(captured["h"]))
    k = k.reshape(1, -1, WIDTH)[0]
    caption = planted_caption(w, b, k[P + objects[0]], k[P + 1])  # cell 1 is background
    patch.hf_vision(model, layers=[index], keep=len(objects) / 25, policy="text")
    with torch.no_grad(), patch.text_guidance(model, caption[None].expand(2, -1)):
        model(pixel_values=x.expand(2, -1, -1, -1))
    kept = patch.kept_patches(model)[index]
    assert kept[:, :-1].tolist() == [objects, objects] and (kept[:, -1] == -1).all()


def test_siglip_model_wrapper_caption_query_and_checkpointing():
    torch.manual_seed(0)
    text = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=40,
                vocab_size=50, max_position_embeddings=8, projection_size=WIDTH)
    siglip = transformers.SiglipModel(transformers.SiglipConfig(vision_config=COMMON, text_config=text)).train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    x = images(batch=2)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            (getattr(siglip, "activation_checkpointing_enable", None) or siglip.gradient_checkpointing_enable)()
        text_features = siglip.get_text_features(input_ids=ids)
        text_features = text_features if isinstance(text_features, torch.Tensor) else text_features.pooler_output
        query = patch.caption_query(siglip, text_features)
        assert torch.equal(query, text_features)  # one width, no projection
        patch.hf_vision(siglip, layers=[1, 2], keep=0.5, policy="text")
        with patch.text_guidance(siglip, query):
            out = siglip.get_image_features(pixel_values=x)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        out.square().sum().backward()
        grad = siglip.vision_model.encoder.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append((out.detach(), grad, patch.kept_patches(siglip)))
        siglip.zero_grad(set_to_none=True)
    (out0, grad0, kept0), (out1, grad1, kept1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(grad1, grad0)
    assert all(torch.equal(kept0[layer], kept1[layer]) for layer in (1, 2))
    with pytest.raises(ValueError, match=f"text_features has width 5, expected the model's embedding width {WIDTH}"):
        patch.caption_query(siglip, torch.randn(2, 5))


def test_blip_model_wrapper_and_caption_query():
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, vocab_size=50)
    blip = transformers.BlipModel(
        transformers.BlipConfig(vision_config=dict(COMMON, initializer_range=0.02), text_config=text, projection_dim=24)
    ).eval()
    features = torch.randn(2, 24)
    query = patch.caption_query(blip, features)
    torch.testing.assert_close(query, features @ blip.visual_projection.weight)
    x = images(batch=2)
    with torch.no_grad():
        ref = blip.get_image_features(pixel_values=x)
        patch.hf_vision(blip, layers=[0, 2], keep=0.5, policy="text")
        with patch.text_guidance(blip, query):
            pruned = blip.get_image_features(pixel_values=x)
        patch.unpatch(blip)
        again = blip.get_image_features(pixel_values=x)
    ref, pruned, again = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (ref, pruned, again))
    assert pruned.shape == ref.shape and not torch.allclose(pruned, ref)
    assert torch.equal(again, ref)
    assert not [m for m in blip.modules() if any(name.startswith("_bus") for name in vars(m))]


@pytest.mark.parametrize("kind", ["siglip", "blip"])
def test_unpatch_restores_exact_behaviour(kind):
    model = make_model(kind)
    x = images()
    classes = [type(layer) for layer in model.encoder.layers]
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output
        patch.hf_vision(model, layers=[0, 2], keep=0.4)
        assert not torch.equal(model(pixel_values=x).pooler_output, ref)
        patch.unpatch(model)
        out = model(pixel_values=x).pooler_output
    assert torch.equal(out, ref)
    assert [type(layer) for layer in model.encoder.layers] == classes
    assert not [m for m in model.modules() if any(name.startswith("_bus") for name in vars(m))]
    assert not [m for m in model.modules() if m._forward_hooks]


def test_bad_arguments_raise_clear_errors():
    model = make_model("siglip")
    with pytest.raises(TypeError, match="must be a Hugging Face CLIPVisionModel, ViTModel, SiglipVisionModel or BlipVisionModel"):
        patch.hf_vision(torch.nn.Linear(2, 2), layers=[0], keep=0.5)
    with pytest.raises(ValueError, match=f"layers: index {DEPTH} is out of range"):
        patch.hf_vision(model, layers=[0, DEPTH], keep=0.5)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        patch.hf_vision(model, layers=[0], keep=-0.5)
    patch.hf_vision(model, layers=[1], keep=0.5, policy="text")
    with pytest.raises(ValueError, match=f"text_query has size 9 in dim 1 .* expected {WIDTH}"):
        with patch.text_guidance(model, torch.randn(3, 9)):
            pass
    with pytest.raises(ValueError, match="text_query has batch size 1 but the images have 3"):
        with patch.text_guidance(model, torch.randn(1, WIDTH)):
            model(pixel_values=images())
    with pytest.raises(ValueError, match="attention_mask cannot survive token pruning"):
        with patch.text_guidance(model, torch.randn(3, WIDTH)):
            model.encoder(model.embeddings(images()), attention_mask=torch.zeros(3, 1, 25, 25))
