"""The text tower equals HF ``BertModel`` with the same weights; load_text_weights maps a local checkpoint."""

import pytest
import torch

import bus_model

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY_TEXT = dict(vocab_size=128, hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96,
                 max_position_embeddings=32, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)


def _hf_bert(tmp_path, layers):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=96, max_position_embeddings=32, hidden_act="gelu")
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path / "bert", safe_serialization=True)
    return hf


@pytest.mark.parametrize("attn_impl", ["sdpa", "varlen"])
def test_text_encoder_equals_hf_bert(tmp_path, attn_impl):
    hf = _hf_bert(tmp_path, layers=4)  # 2 text layers + 2 fusion layers, as ALBEF splits BERT
    model = bus_model.create_model("bus-tiny", text=TINY_TEXT, attn_impl=attn_impl).eval()
    report = model.load_text_weights(tmp_path / "bert")
    assert any(k.startswith("pooler.") for k in report["ignored"])
    ids = torch.randint(4, 128, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    with torch.no_grad():
        ours = model.text_encoder(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]  # after layer 2
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)
    # layers 2 and 3 of the checkpoint initialise the fusion encoder's self-attention and FFN
    # HF's separate query/key/value are fused into one qkv projection on load
    hf_self = hf.encoder.layer[3].attention.self
    torch.testing.assert_close(model.fusion.encoder.layer[1].attention.self.qkv.weight,
                               torch.cat([hf_self.query.weight, hf_self.key.weight, hf_self.value.weight]))
    torch.testing.assert_close(model.fusion.encoder.layer[1].attention.self.qkv.bias,
                               torch.cat([hf_self.query.bias, hf_self.key.bias, hf_self.value.bias]))
    torch.testing.assert_close(model.decoder.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)


def test_load_text_weights_errors(tmp_path):
    model = bus_model.create_model("bus-tiny", text=TINY_TEXT)
    with pytest.raises(FileNotFoundError):
        model.load_text_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model.load_text_weights(tmp_path / "empty")
    _hf_bert(tmp_path, layers=1)  # fewer layers than the text encoder has
    with pytest.raises(ValueError, match="lacks"):
        model.load_text_weights(tmp_path / "bert")
    wide = bus_model.create_model("bus-tiny", text=dict(TINY_TEXT, hidden_size=64, intermediate_size=128))
    with pytest.raises(ValueError, match="shape"):
        wide.load_text_weights(tmp_path / "bert")


def test_text_encoder_equals_hf_last_hidden_state(tmp_path):
    hf = _hf_bert(tmp_path, layers=2)
    model = bus_model.create_model("bus-tiny", text=TINY_TEXT).eval()
    model.load_text_weights(tmp_path / "bert")
    ids = torch.randint(4, 128, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_checkpoints_with_separate_projections_load_into_the_fused_ones():
    """State dicts written before the projections were fused (BERT query/key/value, PAD q/k/v) load strictly
    into the fused model and give the same weights."""
    torch.manual_seed(0)
    source = bus_model.create_model("bus-tiny")
    old_layout = {}
    for key, value in source.state_dict().items():
        prefix, _, kind = key.rpartition(".")
        owner, _, name = prefix.rpartition(".")
        bert = ".attention.self" in f".{owner}" or owner.endswith("crossattention.self")
        parts = {("qkv", True): ("query", "key", "value"), ("kv", True): ("key", "value"),
                 ("qkv", False): ("q", "k", "v"), ("kv", False): ("k", "v")}.get((name, bert))
        if parts is None or owner.startswith("vision."):  # the ViT keeps timm's fused qkv
            old_layout[key] = value
            continue
        for part, chunk in zip(parts, value.chunk(len(parts))):
            old_layout[f"{owner}.{part}.{kind}"] = chunk.clone()
    assert any(k.endswith("attention.self.query.weight") for k in old_layout)
    assert any(k.endswith("crossattention.self.key.weight") for k in old_layout)
    assert any(k.endswith("self_attn.q.weight") for k in old_layout) and any(k.endswith("cross_attn.k.weight") for k in old_layout)
    target = bus_model.create_model("bus-tiny")
    target.load_state_dict(old_layout, strict=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
