"""Synthetic WordPiece tokenizer: round trip, vocabulary coverage, save/load through transformers."""

import pytest

from bus_model.data import synthetic
from bus_model.data.synthetic import make_scene
from bus_model.data.tokenizer import (
    SPECIAL_TOKENS,
    build_synthetic_tokenizer,
    load_tokenizer,
    save_tokenizer,
    synthetic_vocabulary,
    text_config_overrides,
)


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer(model_max_length=24)


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(5))
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)


def test_synthetic_captions_round_trip_without_unknowns(tok):
    vocab = set(synthetic_vocabulary())
    for index in range(200):
        caption = make_scene(1, index)[3]
        assert set(caption.split()) <= vocab
        ids = tok(caption)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) == len(caption.split()) + 2  # every caption word is one token
        assert tok.decode(ids, skip_special_tokens=True) == caption


def test_vocabulary_covers_every_attribute_word():
    vocab = set(synthetic_vocabulary())
    for word in list(synthetic.SHAPES) + list(synthetic.COLOURS) + list(synthetic.SIZES):
        assert word in vocab
    for relation in synthetic.RELATIONS:
        assert set(relation.split()) <= vocab


def test_other_text_falls_back_to_word_pieces(tok):
    text = "A Zebra, 42 stripes!"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra, 42 stripes!"


def test_save_and_load_with_auto_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    run_dir = tmp_path / "run" / "tokenizer"
    save_tokenizer(tok, run_dir)
    captions = [make_scene(5, i)[3] for i in range(8)]
    want = tok(captions, padding=True)["input_ids"]
    for loaded in (load_tokenizer(run_dir), AutoTokenizer.from_pretrained(run_dir),
                   PreTrainedTokenizerFast.from_pretrained(run_dir)):
        assert loaded(captions, padding=True)["input_ids"] == want
        assert loaded.mask_token_id == tok.mask_token_id and len(loaded) == len(tok)


def test_truncation_uses_model_max_length(tok):
    long_text = " ".join(["circle"] * 100)
    assert len(tok(long_text, truncation=True)["input_ids"]) == 24


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_max_length"):
        build_synthetic_tokenizer(model_max_length=2)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TypeError, match="tokenizer"):
        save_tokenizer(object(), tmp_path / "x")


def test_text_config_overrides_follow_the_tokenizer(tok):
    over = text_config_overrides(tok)
    assert over == {"vocab_size": len(tok), "pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4}
    assert over["vocab_size"] > max(tok.get_vocab().values())

    class NoMask:
        pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, None

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="no mask token"):
        text_config_overrides(NoMask())
