"""bus_kernels.patch.hf_vision: drop-in token pruning on tiny random Hugging Face CLIP / ViT vision models.

The pruned outputs are checked against an independent float64 re-implementation that runs the
original HF layers one by one and selects/fuses tokens with plain PyTorch.
"""

import contextlib
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bus_kernels.patch as patch  # noqa: E402

WIDTH, HEADS, DEPTH, IMG, PATCH = 48, 3, 5, 40, 8  # 5 x 5 patches


def make_model(kind, seed=0, **kwargs):
    torch.manual_seed(seed)
    common = dict(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=80,
        image_size=IMG, patch_size=PATCH,
    )
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common, **kwargs)).eval()
    return transformers.ViTModel(transformers.ViTConfig(**common, **kwargs)).eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def expected_keep(keep, n):
    """The documented rule: round-half-up(keep * n), clamped to [1, n]."""
    return min(n, max(1, int(math.floor(keep * n + 0.5))))


def layers_and_attention(model, kind):
    if kind == "clip":
        return model.encoder.layers, [layer.self_attn for layer in model.encoder.layers]
    return model.layers, [layer.attention for layer in model.layers]


def reference_hidden(model, kind, x, layers, keep, fuse, text_query=None):
    """float64 hidden states after the last encoder layer, pruned, written independently of bus_kernels."""
    model = model.double()
    h = model.embeddings(x.double())
    if kind == "clip":
        h = model.pre_layrnorm(h)
    blocks, attns = layers_and_attention(model, kind)
    pre_norms = [block.layer_norm1 if kind == "clip" else block.layernorm_before for block in blocks]
    for index, (block, attn, norm) in enumerate(zip(blocks, attns, pre_norms)):
        B, N, C = h.shape
        D = C // HEADS
        normed = norm(h)
        k = attn.k_proj(normed).view(B, N, HEADS, D)
        if text_query is None:
            query = attn.q_proj(normed[:, :1]).view(B, HEADS, D)
        else:
            query = attn.q_proj(text_query.double()).view(B, HEADS, D)
        h = block(h, None)
        h = h[0] if isinstance(h, tuple) else h
        if index not in layers:
            continue
        scores = (torch.einsum("bhd,bnhd->bhn", query, k[:, 1:]) * D**-0.5).softmax(-1).mean(1)  # (B, n)
        n = N - 1
        kk = expected_keep(keep, n)
        top = scores.topk(kk, dim=1).indices.sort(dim=1).values
        patches = h[:, 1:]
        parts = [h[:, :1], torch.gather(patches, 1, top[:, :, None].expand(-1, -1, C))]
        if fuse:
            w = scores * torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
            parts.append(((w[:, :, None] * patches).sum(1) / w.sum(1, keepdim=True))[:, None])
        h = torch.cat(parts, dim=1)
    return h


@pytest.mark.parametrize("kind", ["clip", "vit"])
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
    [("clip", [1, 3], 0.6, True, "evit"), ("vit", [0, 2], 0.45, False, "text"), ("clip", [2], 0.3, True, "text")],
)
def test_pruned_hidden_states_match_float64_reference(kind, layers, keep, fuse, policy):
    model = make_model(kind)
    x = images(seed=4)
    text_query = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5)) if policy == "text" else None
    with torch.no_grad():
        expected = reference_hidden(model, kind, x, layers, keep, fuse, text_query)
        patch.hf_vision(model, layers=layers, keep=keep, fuse=fuse, policy=policy, backend="torch")
        guidance = (
            patch.text_guidance(model, text_query.double()) if text_query is not None else contextlib.nullcontext()
        )
        with guidance:
            out = model(pixel_values=x.double(), output_hidden_states=True)
    hidden = out.hidden_states[-1]  # before the final norm (ViT's layernorm is applied to last_hidden_state)
    assert hidden.shape == expected.shape
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=2e-6)  # float32 scores weight the fused token


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_token_count_per_layer_as_documented(kind):
    model = make_model(kind)
    layers, keeps = [1, 2, 4], [0.5, 0.77, 0.2]
    patch.hf_vision(model, layers=layers, keep=keeps)
    with torch.no_grad():
        out = model(pixel_values=images(batch=2), output_hidden_states=True)
    n, expected = 25, [26]  # hidden_states[0] is the embeddings
    for index in range(DEPTH):
        if index in layers:
            n = expected_keep(keeps[layers.index(index)], n) + 1
        expected.append(1 + n)
    assert [h.shape[1] for h in out.hidden_states] == expected
    assert out.last_hidden_state.shape == (2, 1 + n, WIDTH)
    assert out.pooler_output.shape == (2, WIDTH)
    assert patch.kept_patches(model)[4].shape == (2, n)


def test_text_policy_different_captions_select_different_tokens():
    model = make_model("clip")
    patch.hf_vision(model, layers=[1], keep=0.2, policy="text")
    x = images(batch=1).expand(4, -1, -1, -1)  # one image, four captions
    captions = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(9)) * 4
    with torch.no_grad(), patch.text_guidance(model, captions):
        out = model(pixel_values=x)
    kept = patch.kept_patches(model)[1]
    assert len({tuple(row.tolist()) for row in kept}) > 1
    assert not torch.allclose(out.last_hidden_state[0], out.last_hidden_state[1])


def test_wrappers_clip_model_and_vit_classifier():
    torch.manual_seed(0)
    vision = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=80,
                  image_size=IMG, patch_size=PATCH)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)).eval()
    x = images(batch=2)
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=x)
        patch.hf_vision(clip, layers=[1], keep=1.0)
        features = clip.get_image_features(pixel_values=x)
        patch.hf_vision(clip, layers=[1], keep=0.5)
        pruned = clip.get_image_features(pixel_values=x)
    assert torch.equal(_tensor(features), _tensor(ref))
    assert _tensor(pruned).shape == _tensor(ref).shape
    assert patch.kept_patches(clip)[1].shape == (2, 13 + 1)
    classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**vision, num_labels=3)).eval()
    patch.hf_vision(classifier, layers=[0, 3], keep=0.5)
    with torch.no_grad():
        assert classifier(pixel_values=x).logits.shape == (2, 3)


def _tensor(output):
    """get_image_features returns a tensor (transformers 4.x) or an output object (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_unpatch_restores_exact_behaviour(kind):
    model = make_model(kind)
    x = images()
    blocks, attns = layers_and_attention(model, kind)
    classes = [type(b) for b in blocks]
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        patch.hf_vision(model, layers=[0, 2], keep=0.4)
        assert model(pixel_values=x).last_hidden_state.shape[1] < ref.shape[1]
        patch.unpatch(model)
        out = model(pixel_values=x).last_hidden_state
    assert torch.equal(out, ref)
    assert [type(b) for b in blocks] == classes
    for block, attn in zip(blocks, attns):
        assert not [name for name in vars(block) if name.startswith("_bus")]
        assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks
    assert not [name for name in vars(model) if name.startswith("_bus")]


def test_gradients_flow_through_patched_model():
    model = make_model("vit").train()
    patch.hf_vision(model, layers=[1, 2], keep=0.5, policy="text")
    text_query = torch.randn(2, WIDTH, requires_grad=True)
    with patch.text_guidance(model, text_query):
        out = model(pixel_values=images(batch=2))
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    assert text_query.grad is not None and text_query.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if name.startswith(("layers.4.", "layers.1.attention.k_proj", "embeddings.patch")):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("policy", ["evit", "text"])
def test_torch_compile_fullgraph(policy):
    model = make_model("clip")
    patch.hf_vision(model, layers=[1, 3], keep=0.6, policy=policy)
    x = images(batch=2)
    guidance = patch.text_guidance(model, torch.randn(2, WIDTH)) if policy == "text" else contextlib.nullcontext()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with guidance, torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        out = compiled(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 1 + expected_keep(0.6, expected_keep(0.6, 25) + 1) + 1, WIDTH)


def test_bad_arguments_raise_clear_errors():
    model = make_model("clip")
    with pytest.raises(ValueError, match=f"layers: index {DEPTH} is out of range"):
        patch.hf_vision(model, layers=[DEPTH], keep=0.5)
    for keep in (0.0, 1.01):
        with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
            patch.hf_vision(model, layers=[0], keep=keep)
    with pytest.raises(ValueError, match="policy must be one of"):
        patch.hf_vision(model, layers=[0], keep=0.5, policy="elip")
    with pytest.raises(TypeError, match="must be a Hugging Face CLIPVisionModel, ViTModel, SiglipVisionModel or BlipVisionModel"):
        bert = transformers.BertModel(
            transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40)
        )
        patch.hf_vision(bert, layers=[0], keep=0.5)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        patch.hf_vision("clip", layers=[0], keep=0.5)
    assert not [name for name in vars(model) if name.startswith("_bus")]
    patch.hf_vision(model, layers=[0], keep=0.5, policy="text")
    with pytest.raises(ValueError, match="needs a caption embedding"):
        model(pixel_values=images())
    with pytest.raises(ValueError, match=f"text_query has size 7 in dim 1 .* expected {WIDTH}"):
        with patch.text_guidance(model, torch.randn(3, 7)):
            pass
    with pytest.raises(ValueError, match="text_query has batch size 2 but the images have 3"):
        with patch.text_guidance(model, torch.randn(2, WIDTH)):
            model(pixel_values=images())


# ---------------------------------------------------------------------------------------------
# register_hf_attention: an HF text encoder on packed sequences through bus_kernels.varlen_attention

import bus_kernels  # noqa: E402

needs_varlen = pytest.mark.skipif(
    not hasattr(bus_kernels, "varlen_attention"), reason="bus_kernels.varlen_attention not available"
)


def tiny_bert(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=30, num_hidden_layers=2, num_attention_heads=3, intermediate_size=44,
        max_position_embeddings=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **kwargs,
    )
    return transformers.BertModel(config).to(dtype).eval()


def padded_batch(lengths, seqlen, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (len(lengths), seqlen), generator=g)
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@needs_varlen
@pytest.mark.parametrize("reference", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [[9, 4, 1, 7], [9, 9]])  # padded batch; nothing padded (mask None)
def test_bert_on_packed_sequences_equals_hf_attention(reference, lengths):
    name = patch.register_hf_attention()
    model = tiny_bert(torch.float64)
    ids, mask = padded_batch(lengths, 9)
    model.set_attn_implementation(reference)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()  # padded positions are not defined by either implementation
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)


@needs_varlen
@pytest.mark.skipif("triton" not in bus_kernels.available_backends("cpu") and not torch.cuda.is_available(),
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_bert_on_triton_varlen_kernel_equals_eager():
    """The registered function with the backend pinned to the Triton kernel (interpreter on CPU), fp32."""
    name = patch.register_hf_attention("bus_varlen_triton", backend="triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_bert().to(device)
    ids, mask = padded_batch([5, 2, 4], 5, seed=12)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation(name)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-4, atol=1e-5)


@needs_varlen
def test_bert_gradients_equal_eager():
    patch.register_hf_attention()
    ids, mask = padded_batch([6, 3, 5], 6, seed=4)
    grads = {}
    for impl in ("eager", "bus_varlen"):
        model = tiny_bert(torch.float64)
        model.set_attn_implementation(impl)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (out[mask.bool()] ** 2).sum().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["bus_varlen"].keys()
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["bus_varlen"][n], g, rtol=1e-9, atol=1e-10, msg=n)


@needs_varlen
def test_bert_sequences_packed_into_one_row():
    """A flattening collator's layout: one row, positions restarting, cu_seq_lens passed as kwargs."""
    patch.register_hf_attention()
    model = tiny_bert(torch.float64)
    lengths = [5, 2, 7]
    ids, mask = padded_batch(lengths, 7, seed=6)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]  # (14, C)
        model.set_attn_implementation("bus_varlen")
        cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
        packed = model(
            input_ids=ids[mask.bool()][None],
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
        ).last_hidden_state[0]
    torch.testing.assert_close(packed, expected, rtol=1e-10, atol=1e-10)


def _sdpa_reference(q, k, v, key_mask, causal, scale):
    """(B, Sq, H, D) float64 attention with a key padding mask and a causal mask aligned bottom-right to
    each row's unpadded key count (flash-attn varlen semantics)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    allowed = key_mask.bool()[:, None, None, :].expand_as(logits).clone()
    if causal:
        Sq, Sk = q.shape[2], k.shape[2]
        for b, length in enumerate(key_mask.sum(1).tolist()):
            q_length = length if Sq == Sk else Sq  # with Sq == Sk the mask also marks the queries
            allowed[b] &= torch.ones(Sq, Sk, dtype=torch.bool).tril(length - q_length)
    return torch.einsum("bhqk,bhkd->bqhd", logits.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@needs_varlen
@pytest.mark.parametrize("Sq, Sk, causal", [(6, 6, True), (3, 7, False), (4, 7, True)])
def test_attention_function_gqa_causal_cross_against_reference(Sq, Sk, causal):
    g = torch.Generator().manual_seed(11)
    B, H, H_kv, D = 2, 4, 2, 5
    q = torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, Sk, D, generator=g, dtype=torch.float64)
    lengths = [Sk, Sk - 2]
    key_mask = (torch.arange(Sk)[None] < torch.tensor(lengths)[:, None]).long()
    out, weights = patch.hf_varlen_attention(
        torch.nn.Module(), q, k, v, key_mask, scaling=0.3, is_causal=causal
    )
    expected = _sdpa_reference(q, k, v, key_mask, causal, 0.3)
    assert weights is None and out.shape == (B, Sq, H, D)
    if Sq == Sk:  # the mask also marks the query tokens; padded query rows come back as zeros
        valid = key_mask.bool()
        torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)
        assert not out[~valid].any()
    else:
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@needs_varlen
def test_attention_function_bad_inputs():
    q = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="needs a 2D padding mask"):
        patch.hf_varlen_attention(torch.nn.Module(), q, q, q, torch.ones(2, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="has no attention dropout"):
        patch.hf_varlen_attention(torch.nn.Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="not a multiple of key's 3"):
        kv = torch.randn(2, 3, 3, 4)
        patch.hf_varlen_attention(torch.nn.Module(), q, kv, kv, None)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        patch.register_hf_attention("")
    with pytest.raises(TypeError, match="backend must be a str or None"):
        patch.register_hf_attention("x", backend=1)
    patch.register_hf_attention()
    training = tiny_bert()
    training.config.attention_probs_dropout_prob = 0.1
    for layer in training.encoder.layer:
        layer.attention.self.dropout.p = 0.1
    training.set_attn_implementation("bus_varlen")
    training.train()
    ids, mask = padded_batch([3, 2], 3)
    with pytest.raises(ValueError, match="has no attention dropout"):
        training(input_ids=ids, attention_mask=mask)
