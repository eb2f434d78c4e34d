"""torch.compile(fullgraph=True) of patched models and of the ``bus_varlen`` HF attention path.

``fullgraph=True`` turns any graph break into an error, so each test passing means one graph with no
``.item()`` / data-dependent branch in it. The ``aot_eager`` backend traces forward and backward like
inductor does but runs the traced ops eagerly (inductor's C++ compilation is minutes on this CPU).
"""

import contextlib

import pytest
import torch

import bus_kernels.patch as patch
from _patch_planted import schedule

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, backend="aot_eager", fullgraph=True)


def train_step_matches(model, run):
    """Loss and gradients of ``run(model)`` equal to those of ``run(compiled model)``; returns the loss."""
    results = []
    for fn in (model, compiled(model)):
        model.zero_grad(set_to_none=True)
        loss = run(fn).float().square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    return loss0


@pytest.mark.parametrize("policy", ["evit", "text"])
def test_timm_vit_train_step(policy):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, depth=4).train()
    patch.timm(model, layers=[1, 2], keep=0.5, policy=policy)
    x = torch.randn(2, 3, 48, 48)
    text = torch.randn(2, 192)
    guidance = patch.text_guidance(model, text) if policy == "text" else contextlib.nullcontext()
    with guidance:
        train_step_matches(model, lambda fn: fn(x))
    assert patch.kept_patches(model)[2].shape == (2, schedule(36, 1, 4, [1, 2], 0.5)[-1] - 1)


@pytest.mark.parametrize("block, policy", [("default", "evit"), ("default", "text"), ("custom", "text")])
def test_open_clip_vit_forward_and_train_step(block, policy):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    cfg = dict(image_size=40, patch_size=8, width=48, head_width=16, layers=4, mlp_ratio=2.0)
    if block == "custom":
        cfg["qk_norm"] = True
    visual = open_clip.CLIP(
        embed_dim=32, vision_cfg=cfg, text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    ).visual
    patch.open_clip(visual, layers=[1, 2], keep=0.6, policy=policy)
    x = torch.randn(2, 3, 40, 40)
    guidance = patch.text_guidance(visual, torch.randn(2, 48)) if policy == "text" else contextlib.nullcontext()
    with guidance:
        visual.eval()
        with torch.no_grad():  # eval + no_grad: nn.MultiheadAttention's fast path
            torch.testing.assert_close(compiled(visual)(x), visual(x))
        visual.train()
        train_step_matches(visual, lambda fn: fn(x))
    assert patch.kept_patches(visual)[2].shape == (2, schedule(25, 1, 4, [1, 2], 0.6)[-1] - 1)


transformers = pytest.importorskip("transformers")


def bert(dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=30, num_hidden_layers=2, num_attention_heads=3, intermediate_size=44,
        max_position_embeddings=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    return transformers.BertModel(config, add_pooling_layer=False).to(dtype)


def padded(lengths, seqlen, vocab=61, seed=3, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seqlen), generator=g)
    positions = torch.arange(seqlen)[None]
    lengths = torch.tensor(lengths)[:, None]
    mask = (positions >= seqlen - lengths) if left else (positions < lengths)
    return ids * mask, mask.long()


@pytest.mark.parametrize("left", [False, True])
def test_bus_varlen_bert_with_padding_mask(left):
    """The padded-batch path: static shapes under compile, equal to eager attention on the real tokens."""
    name = patch.register_hf_attention()
    model = bert().train()
    ids, mask = padded([9, 4, 1, 6], 9, left=left)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation(name)
    valid = mask.bool()
    out = compiled(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)
    train_step_matches(model, lambda fn: fn(input_ids=ids, attention_mask=mask).last_hidden_state[valid])


@pytest.mark.parametrize("left", [False, True])
def test_bus_varlen_causal_clip_text_with_padding_mask(left):
    """Causal + padding (CLIP's text tower): the causal order among a row's kept tokens is unchanged."""
    name = patch.register_hf_attention()
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=10, attention_dropout=0.0,
    )
    model = transformers.CLIPTextModel(config).double().eval()
    ids, mask = padded([7, 3, 5], 7, vocab=50, left=left)
    with torch.no_grad():
        # sdpa as the reference: CLIP's eager path masks with a float32 minimum (1e-7 apart in float64)
        model.set_attn_implementation("sdpa")
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation(name)
        packed = model(input_ids=ids, attention_mask=mask).last_hidden_state  # uncompiled: the packed path
        out = compiled(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[valid], packed[valid], rtol=1e-10, atol=1e-10)


def test_bus_varlen_packed_row_with_tensor_max_length():
    """A flattening collator's packed row with ``max_length_*`` as tensors: no ``.item()`` in the graph."""
    patch.register_hf_attention()
    model = bert().eval()
    lengths = [5, 2, 7]
    ids, mask = padded(lengths, 7, seed=6)
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        model.set_attn_implementation("bus_varlen")
        out = compiled(model)(
            input_ids=ids[mask.bool()][None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=torch.tensor(7), max_length_k=torch.tensor(7),
        ).last_hidden_state[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_patched_clip_vision_on_bus_varlen():
    """Pruning and the varlen attention together, one graph."""
    name = patch.register_hf_attention()
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=80, image_size=40, patch_size=8,
    )
    model = transformers.CLIPVisionModel(config).eval()
    model.set_attn_implementation(name)
    patch.hf_vision(model, layers=[1, 2], keep=0.5, policy="text")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), patch.text_guidance(model, torch.randn(2, 48)):
        expected = model(pixel_values=x).last_hidden_state
        out = compiled(model)(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, schedule(25, 1, 5, [1, 2], 0.5)[-1], 48)


def test_compiled_causal_cross_attention_with_padding_is_refused():
    q = torch.randn(2, 2, 3, 4)
    kv = torch.randn(2, 2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.long)

    def attend(q, kv, mask):
        return patch.hf_varlen_attention(torch.nn.Module(), q, kv, kv, mask, is_causal=True)[0]

    torch._dynamo.reset()
    with pytest.raises(Exception, match="S_q=3 != S_k=5"):
        torch.compile(attend, backend="aot_eager", fullgraph=True)(q, kv, mask)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
@pytest.mark.parametrize("policy", ["random", "tome"])
def test_random_and_tome_policies_compile(family, policy):
    torch.manual_seed(0)
    if family == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=40, patch_size=8, depth=4)
        patch.timm(model, layers=[1, 2], keep=0.6, policy=policy)
    else:
        open_clip = pytest.importorskip("open_clip")
        cfg = dict(image_size=40, patch_size=8, width=48, head_width=16, layers=4, mlp_ratio=2.0)
        model = open_clip.CLIP(
            embed_dim=32, vision_cfg=cfg, text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
        ).visual
        patch.open_clip(model, layers=[1, 2], keep=0.6, policy=policy)
    model.train()  # random reduces in training only
    x = torch.randn(2, 3, 40, 40)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    if policy == "random":  # the compiled graph draws from its own RNG stream: compare shapes and counts
        out = compiled(model)(x)
        assert out.shape == expected.shape
    else:
        train_step_matches(model, lambda fn: fn(x))
    assert patch.kept_patches(model)[2].shape == (2, schedule(25, 1, 4, [1, 2], 0.6, fuse=False)[-1] - 1)
