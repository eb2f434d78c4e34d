"""losses.itc_image (issue 24 item 4): where the ITC image embedding comes from when the caption guides
selection. "guided" (the caption-steered pass), "detached" (scores detached where tokens are fused, as ELIP),
"text_free" (a caption-free pass sharing the blocks before the first selection layer)."""

from __future__ import annotations

import pytest
import torch

from bus_model import create_model, get_config

ONLY_ITC = dict(losses__itm=False, losses__mlm=False, losses__prefix_lm=False, losses__ptm=False)


def _batch(model, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision, model.config.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    ids = torch.randint(t.mask_token_id + 1, t.vocab_size, (batch, 10), generator=g)
    ids[:, 0], ids[:, -1] = t.cls_token_id, t.sep_token_id
    mask = torch.ones_like(ids)
    labels = (torch.rand(batch, model.vision.num_patches, generator=g) < 0.2).float()
    return images, ids, mask, labels


def _model(itc_image: str, **overrides):
    torch.manual_seed(0)
    return create_model("bus-tiny", losses__itc_image=itc_image, **overrides)


def _spy_text_query(model) -> list[torch.Tensor]:
    """Keep the text query as it enters the ViT's selection (after text_query_proj), with its gradient."""
    seen: list[torch.Tensor] = []
    original = model.vision._text_in_vision_width

    def spy(query):
        out = original(query)
        if out is not None and out.requires_grad:
            out.retain_grad()
            seen.append(out)
        return out

    model.vision._text_in_vision_width = spy
    return seen


def test_bad_itc_image_raises_naming_the_field():
    with pytest.raises(ValueError, match="losses.itc_image"):
        get_config("bus-tiny", losses__itc_image="caption")
    assert get_config("bus-tiny").losses.itc_image == "text_free"  # the default (issue 24's 3-seed comparison)


@pytest.mark.parametrize("choice", ["guided", "detached", "text_free"])
def test_each_choice_trains(choice):
    model = _model(choice).train()
    batch = _batch(model)
    torch.manual_seed(1)
    out = model(*batch)
    assert torch.isfinite(out.loss) and set(out.losses) >= {"itc", "itm", "mlm", "ptm"}
    out.loss.backward()
    for name in ("vision.blocks.0.attn.qkv.weight", "vision.blocks.3.attn.qkv.weight", "vision_proj.weight",
                 "vision.text_query_proj.weight", "text_encoder.embeddings.word_embeddings.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (choice, name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    torch.manual_seed(1)
    assert torch.isfinite(model(*batch).loss)


def test_itc_alone_reaches_the_selector_only_when_guided():
    grads = {}
    for choice in ("guided", "detached", "text_free"):
        model = _model(choice, **ONLY_ITC).train()
        seen = _spy_text_query(model)
        out = model(*_batch(model))
        assert set(out.losses) == {"itc"}
        out.loss.backward()
        assert len(seen) == 1
        grads[choice] = seen[0].grad
        proj = model.vision.text_query_proj.weight.grad
        if choice == "guided":
            assert proj is not None and proj.abs().sum() > 0
        else:  # the text-guided selection's producer gets nothing from ITC
            assert proj is None or proj.abs().sum() == 0, choice
    assert grads["guided"] is not None and grads["guided"].abs().sum() > 0
    for choice in ("detached", "text_free"):
        assert grads[choice] is None or grads[choice].abs().sum() == 0, choice


def test_detached_keeps_values_and_ptm_still_trains_the_selector():
    batch = _batch(_model("guided"))
    outs = {}
    for choice in ("guided", "detached"):
        model = _model(choice).train()
        torch.manual_seed(3)
        outs[choice] = model(*batch)
    for name, value in outs["guided"].losses.items():  # detaching changes gradients, never values
        torch.testing.assert_close(outs["detached"].losses[name], value, rtol=0, atol=0)
    model = _model("detached", losses__itc=False, losses__itm=False, losses__mlm=False, losses__prefix_lm=False)
    seen = _spy_text_query(model)
    out = model.train()(*batch)
    assert set(out.losses) == {"ptm"}
    out.loss.backward()
    assert seen[0].grad is not None and seen[0].grad.abs().sum() > 0


def test_text_free_embedding_is_what_retrieval_encodes():
    model = _model("text_free").eval()
    images, ids, mask, labels = _batch(model)
    with torch.no_grad():
        out = model(images, ids, mask, labels)
        text = model.encode_text(ids, mask)
        free = model.encode_image(images)  # retrieval: no caption
        guided = model.encode_image(images, text.hidden[:, 0])
    torch.testing.assert_close(out.image_feat, free.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.memory, guided.memory, rtol=1e-5, atol=1e-6)  # ITM/MLM/LM: caption-guided
    assert not torch.allclose(free.embedding, guided.embedding)
    # the selection records (PTM) come from the guided pass
    assert [r.layer for r in out.selections] == list(model.config.selection.layers)


def test_policies_without_a_caption_ignore_the_choice():
    for policy in ("evit", "random"):
        a, b = (_model(c, selection__policy=policy).train() for c in ("guided", "text_free"))
        batch = _batch(a)
        torch.manual_seed(5)
        la = a(*batch).loss
        torch.manual_seed(5)
        lb = b(*batch).loss
        torch.testing.assert_close(la, lb, rtol=0, atol=0)


@pytest.mark.parametrize("keep_mode", ["ratio", "mass"])
def test_stacked_guided_and_text_free_rows_equal_two_passes(keep_mode):
    """forward_features_and_text_free runs the guided and the caption-free rows as one 2B-row pass: the same
    features, masks and selection records as the two passes run apart (ragged rows too: keep_mode mass)."""
    model = _model("text_free", selection__keep_mode=keep_mode).train()
    images, ids, mask, _ = _batch(model, batch=3)
    text_cls = model.encode_text(ids, mask).hidden[:, 0]
    vit = model.vision
    guided, free = vit.forward_features_and_text_free(images, text_cls)
    apart_guided = vit.forward_features(images, text_cls)
    apart_free = vit.forward_features(images)
    for got, want in ((guided, apart_guided), (free, apart_free)):
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        assert (got.mask is None) == (want.mask is None)
        if got.mask is not None:
            assert torch.equal(got.mask, want.mask)
        assert len(got.selections) == len(want.selections)
        for a, b in zip(got.selections, want.selections):
            assert a.layer == b.layer
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
            for field in ("positions", "kept_positions", "num_kept"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
    # gradients reach the caption query through the guided rows only
    guided.tokens.sum().backward()
    assert vit.text_query_proj.weight.grad is not None and vit.text_query_proj.weight.grad.abs().sum() > 0
