"""Tokenizers: a WordPiece tokenizer for the synthetic data, and loading a local HF tokenizer directory.

The synthetic tokenizer is a BERT-style WordPiece (``tokenizers`` library): lower-casing BERT
normaliser and pre-tokeniser, ``[CLS] text [SEP]`` post-processing, and a vocabulary of the special
tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), every word the synthetic captions use (see
``bus_model.data.synthetic``), and single characters with their ``##`` continuations, so any other
ASCII text still tokenises (character by character) instead of collapsing to ``[UNK]``. It is built
from its vocabulary, not trained, so it is identical on every machine.

A training run saves its tokenizer with ``save_pretrained`` into the run directory; that directory
loads back with ``transformers.AutoTokenizer`` (``load_tokenizer``). Real runs point ``load_tokenizer``
at a local HF tokenizer directory (e.g. a downloaded ``bert-base-uncased``); nothing is fetched.
"""

from __future__ import annotations

import os
import string

from . import synthetic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CHARACTERS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def synthetic_vocabulary() -> list[str]:
    """Every whole word the synthetic captions can contain, sorted."""
    words = set(synthetic.SHAPES) | set(synthetic.COLOURS) | set(synthetic.SIZES) | {"a", "an"}
    for phrase in synthetic.RELATIONS + synthetic.TEMPLATES:
        words.update(w for w in phrase.replace("{a}", " ").replace("{b}", " ").replace("{rel}", " ").split())
    return sorted(words)


def build_synthetic_tokenizer(model_max_length: int = 32):
    """WordPiece tokenizer for the synthetic captions, as a ``transformers`` fast tokenizer.

    Args:
        model_max_length: int >= 4, the longest sequence (with [CLS] and [SEP]) it will produce when
            asked to truncate.

    Returns:
        ``PreTrainedTokenizerFast`` with ``pad_token_id == 0``, ``cls``/``sep``/``mask``/``unk`` set.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 4:
        raise ValueError(f"model_max_length must be an int >= 4, got {model_max_length!r}")
    tokens = list(SPECIAL_TOKENS)
    for t in synthetic_vocabulary() + list(_CHARACTERS) + ["##" + c for c in _CHARACTERS]:
        if t not in tokens:
            tokens.append(t)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )


def text_config_overrides(tokenizer) -> dict[str, int]:
    """The text-tower settings a tokenizer dictates: ``{"vocab_size", "pad_token_id", "cls_token_id",
    "sep_token_id", "mask_token_id"}`` (e.g. ``get_config(name, text=text_config_overrides(tok))``).

    Raises ValueError if the tokenizer lacks one of the special tokens BUS needs."""
    ids = {}
    for name in ("pad", "cls", "sep", "mask"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is None:
            raise ValueError(f"tokenizer has no {name} token; BUS needs [PAD], [CLS], [SEP] and [MASK]")
        ids[f"{name}_token_id"] = int(value)
    return {"vocab_size": len(tokenizer), **ids}


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> str:
    """``tokenizer.save_pretrained(directory)`` (creating it); returns the directory."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | os.PathLike):
    """Load a tokenizer saved with ``save_pretrained`` (a run directory or a local HF tokenizer
    directory) with ``transformers.AutoTokenizer``, offline.

    Raises FileNotFoundError if ``directory`` does not exist or holds no tokenizer files."""
    from transformers import AutoTokenizer

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in known):
        raise FileNotFoundError(f"{directory} holds no tokenizer (none of {', '.join(known)})")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
