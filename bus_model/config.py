"""Model configuration: dataclasses with commented fields, loaded from the named JSON files in ``configs/``.

The sizes follow the BUS paper (arXiv 2307.08504, §4.1 "Implementation Details"): a ViT-B/16 image
encoder, a 6-layer BERT-base text encoder, a 6-layer fusion encoder and a 12-layer decoder. Values the
paper does not state (exact TSPS layers, PAD size, PTM weighting) are fields here; their defaults and
why are in ARCHITECTURE.md ("Values the paper leaves open"). Every ``<name>`` config has a
``<name>-baseline`` twin: same stack, no token selection and no PAD, so the fusion encoder and
decoder see every ViT token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from bus_kernels._validation import is_number  # int or float, not bool (JSON true would pass as 1)

from .selection import KEEP_ROUNDING, POLICIES, RATIO_OF, TEXT_FREE  # noqa: F401  (POLICIES re-exported)
ATTN_IMPLS = ("sdpa", "varlen")
ITC_IMAGE = ("guided", "detached", "text_free")  # LossConfig.itc_image


@dataclass
class VisionConfig:
    """ViT image encoder (timm ``VisionTransformer`` layout, so timm weights load as they are)."""

    image_size: int = 224  # input height = width in pixels
    patch_size: int = 16  # square patches; image_size must be a multiple
    in_chans: int = 3  # image channels
    width: int = 768  # embedding dimension C
    depth: int = 12  # number of Transformer blocks
    num_heads: int = 12  # attention heads; width must be a multiple
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width
    qkv_bias: bool = True  # bias in the fused qkv projection (timm default)
    layer_norm_eps: float = 1e-6  # timm's ViT LayerNorm epsilon
    # std of the truncated-normal init of the ViT's Linear weights (timm: 0.02, suited to width 384-1024). At a CPU
    # config's width 64 it gives each sub-layer a gain of about 0.16, so the blocks start as near-identities
    # and held-out retrieval rises slowly (issue 12, measured in the README); bus-mini sets width ** -0.5
    initializer_range: float = 0.02


@dataclass
class SelectionConfig:
    """Token selection inside the ViT (BUS §3.2 TSPS; ELIP §3; EViT)."""

    policy: str = "bus"  # one of selection.POLICIES: "bus" (text [CLS] query, TSPS) | "elip" | "evit" (image
    # [CLS]) | "random" (FLIP masking) | "tome" (token merging) | "none"
    layers: tuple[int, ...] = (3, 6, 9)  # 0-based blocks; bus/evit/tome act after that block's attention,
    # elip/random before that block (elip after a no-grad look-ahead; random at layer 0 = at the patch embedding)
    keep_ratios: tuple[float, ...] = (0.7, 0.7, 0.7)  # one per layer, each in (0, 1] (tome: merges down to it)
    # keep_ratios are a share of "current": the candidates left | "original": the image's patches | "auto": the
    # policy's own (elip -> original, every other policy -> current)
    ratio_of: str = "auto"
    # "round" | "floor" (ELIP's official code: int(ratio * num_patches)) | "auto": elip -> floor, others -> round
    keep_rounding: str = "auto"
    lookahead: tuple[int, ...] = ()  # elip: blocks each look-ahead runs (ELIP's num_act_layers), one per layer;
    # () = up to the next selection layer (or the last block)
    text_free: str = "auto"  # without a caption: "evit" (image [CLS]) | "none" (prune nothing) | "auto" (the
    # policy's default: bus -> evit, elip -> none, as ELIP's official code does)
    random_at_eval: bool = False  # random: also drop patches in eval mode (FLIP: training only)
    tome_r: int = 0  # tome: merge this many tokens at each configured layer; 0 = down to keep_ratios
    fuse: bool = True  # merge the dropped tokens into one score-weighted token
    keep_mode: str = "ratio"  # "ratio": fixed count per layer | "mass": per image with keep_by_mass (ragged)
    keep_mass: float = 0.9  # keep_mode="mass": share of the score mass the kept tokens must hold
    min_keep_ratio: float = 0.1  # keep_mode="mass": lower clamp on the kept share of candidates
    elip_visual_weight: float = 0.8  # elip: fused query = w * visual CLS + (1 - w) * text CLS


@dataclass
class TextConfig:
    """BERT text encoder (HF ``transformers`` ``BertModel`` layout). Fusion and decoder share its sizes."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 6  # text-only layers (BUS: the first 6 layers of BERT-base)
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0  # BERT uncased ids: [PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103
    cls_token_id: int = 101  # also the decoder's begin-of-sentence token
    sep_token_id: int = 102  # also the decoder's end-of-sentence token
    mask_token_id: int = 103
    # std of the normal init of every Linear/Embedding outside the ViT (HF BertConfig.initializer_range). BERT's
    # 0.02 suits its width (768); at a CPU config's width (48-64) it leaves each sub-layer ~40x weaker than the
    # residual, so the text [CLS] is the same vector for every caption and ITC gets no signal (issue 12):
    # the small configs set about hidden_size ** -0.5
    initializer_range: float = 0.02


@dataclass
class PadConfig:
    """Patch Abstraction Decoder (BUS §3.3): M learnable queries summarise the kept patches."""

    enabled: bool = True  # False in the baselines: the fusion layers see all ViT tokens
    num_queries: int = 64  # M, the length of the visual summary
    num_layers: int = 2  # each: self-attention, cross-attention to [CLS + kept + fused], MLP
    mlp_ratio: float = 4.0


@dataclass
class LossConfig:
    """Pre-training objectives (BUS §3.4); each can be switched off and is returned separately."""

    itc: bool = True  # image-text contrastive, learnable temperature, symmetric InfoNCE
    itm: bool = True  # image-text matching with hard negatives mined from ITC similarities
    mlm: bool = True  # masked language modelling through the fusion encoder
    prefix_lm: bool = True  # captioning loss on the decoder, the image summary as prefix
    ptm: bool = True  # patch-text matching on the selector's scores (needs patch_labels)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    prefix_lm_weight: float = 1.0
    ptm_weight: float = 1.0
    embed_dim: int = 256  # ITC projection size
    temperature: float = 0.07  # initial ITC temperature (learned as log(1 / temperature))
    mlm_probability: float = 0.15  # share of text tokens masked (80% [MASK], 10% random, 10% kept)
    itm_negatives: str = "sample"  # "sample": draw from softmax(ITC sims) | "hardest": argmax
    # share of ITM negatives drawn uniformly instead (0: ALBEF). Trained from scratch, ITC-mined negatives already
    # share the caption's attributes after ~100 steps, and ITM stays at its prior (issue 12, README); a share of
    # easy negatives lets it start. bus-mini and its baseline set 0.5
    itm_random_share: float = 0.0
    # ALBEF momentum distillation (momentum.py): an EMA model gives ITC queue features and soft targets
    momentum_distill: bool = False  # on in the base configs; off: plain in-batch ITC and hard MLM labels
    momentum: float = 0.995  # EMA momentum in [0, 1)
    queue_size: int = 65536  # ITC feature queue length K (ALBEF: 65,536); a multiple of the global batch
    distill_alpha: float = 0.4  # weight of the momentum model's soft targets in ITC and MLM
    alpha_ramp_steps: int = 1000  # alpha ramps linearly from 0 over these training steps (ALBEF: the first epoch)
    prefix_split: str = "none"  # PrefixLM (SimVLM/mPLUG): "random" splits each caption at a random point, the
    # prefix is decoder context and the loss covers the rest; "none": plain captioning (empty prefix)
    # where the ITC image embedding comes from when the caption guides selection (bus, elip; issue 24). "guided":
    # the one ViT pass that the caption steered, whose selection scores carry gradient into the fused token, so
    # in-batch ITC sees each positive image conditioned on its own caption while retrieval encodes images
    # without one (a shortcut). "detached": that pass with the scores detached where the dropped tokens are
    # fused (ELIP selects under no_grad with constant merge weights): no loss but PTM steers the selector.
    # "text_free": ITC reads a caption-free pass (the policy's text-free mode, what retrieval encodes; mPLUG's
    # plain ViT pass) that shares the blocks before the first selection layer with the guided pass (one stacked
    # 2B-row pass). The default, chosen by the declared metric of bus bench quality (issue 24): 3 seeds on the
    # cluttered scene, unpruned mean R@1 text_free 0.079 vs guided 0.008 and detached 0.013 (baseline 0.097;
    # benchmarks/results/quality_ablation/itc_image_cluttered.json)
    itc_image: str = "text_free"


@dataclass
class BusConfig:
    """The whole BUS vision-language model."""

    name: str = "bus-base"
    vision: VisionConfig = field(default_factory=VisionConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pad: PadConfig = field(default_factory=PadConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    fusion_layers: int = 6  # text self-attention + cross-attention to the visual memory
    decoder_layers: int = 12  # causal decoder with cross-attention to the visual memory
    max_text_len: int = 32  # longest caption (tokens, with [CLS] and [SEP]) the data pipeline produces
    attn_impl: str = "sdpa"  # "sdpa": padded + masks | "varlen": packed through bus_kernels.varlen_attention
    kernel_backend: str | None = None  # bus_kernels backend for the pruning ops (None: best available)

    def validate(self) -> "BusConfig":
        """Raise ``ValueError`` naming the field when the configuration is inconsistent; returns self."""
        v, s, t = self.vision, self.selection, self.text
        if v.image_size % v.patch_size:
            raise ValueError(f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size ({v.patch_size})")
        if v.width % v.num_heads:
            raise ValueError(f"vision.width ({v.width}) must be a multiple of vision.num_heads ({v.num_heads})")
        if t.hidden_size % t.num_heads:
            raise ValueError(f"text.hidden_size ({t.hidden_size}) must be a multiple of text.num_heads ({t.num_heads})")
        if s.policy not in POLICIES:
            raise ValueError(f"selection.policy must be one of {POLICIES}, got {s.policy!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if s.keep_mode not in ("ratio", "mass"):
            raise ValueError(f"selection.keep_mode must be 'ratio' or 'mass', got {s.keep_mode!r}")
        if s.ratio_of not in RATIO_OF:
            raise ValueError(f"selection.ratio_of must be one of {RATIO_OF}, got {s.ratio_of!r}")
        if s.text_free not in TEXT_FREE:
            raise ValueError(f"selection.text_free must be one of {TEXT_FREE}, got {s.text_free!r}")
        if s.keep_rounding not in KEEP_ROUNDING:
            raise ValueError(f"selection.keep_rounding must be one of {KEEP_ROUNDING}, got {s.keep_rounding!r}")
        if s.policy != "none":
            _validate_schedule(s, v)
            if len(s.layers) != len(s.keep_ratios):
                raise ValueError(
                    f"selection.layers ({list(s.layers)}) and selection.keep_ratios ({list(s.keep_ratios)}) "
                    "must have the same length"
                )
            if list(s.layers) != sorted(set(s.layers)) or any(not 0 <= i < v.depth for i in s.layers):
                raise ValueError(f"selection.layers must be increasing block indices in [0, {v.depth}), got {list(s.layers)}")
            for r in s.keep_ratios:
                if not is_number(r) or not 0.0 < r <= 1.0:
                    raise ValueError(f"selection.keep_ratios must each be in (0, 1], got {list(s.keep_ratios)}")
            if not 0.0 < s.keep_mass <= 1.0:
                raise ValueError(f"selection.keep_mass must be in (0, 1], got {s.keep_mass}")
            if not 0.0 < s.min_keep_ratio <= 1.0:
                raise ValueError(f"selection.min_keep_ratio must be in (0, 1], got {s.min_keep_ratio}")
        if self.pad.enabled and (self.pad.num_queries < 1 or self.pad.num_layers < 1):
            raise ValueError("pad.num_queries and pad.num_layers must be >= 1 when pad.enabled")
        if not 0.0 < self.losses.mlm_probability < 1.0:
            raise ValueError(f"losses.mlm_probability must be in (0, 1), got {self.losses.mlm_probability}")
        _validate_distillation(self.losses)
        for section, ir in (("text", t.initializer_range), ("vision", v.initializer_range)):
            if not is_number(ir) or not 0.0 < ir < 1.0:
                raise ValueError(f"{section}.initializer_range must be a number in (0, 1), got {ir!r}")
        if self.losses.itm_negatives not in ("sample", "hardest"):
            raise ValueError(f"losses.itm_negatives must be 'sample' or 'hardest', got {self.losses.itm_negatives!r}")
        share = self.losses.itm_random_share
        if not is_number(share) or not 0.0 <= share <= 1.0:
            raise ValueError(f"losses.itm_random_share must be a number in [0, 1], got {share!r}")
        if self.max_text_len > t.max_position_embeddings:
            raise ValueError(
                f"max_text_len ({self.max_text_len}) exceeds text.max_position_embeddings ({t.max_position_embeddings})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BusConfig":
        """Build from a (possibly partial) nested dict; unknown keys raise ``ValueError``."""
        return _build(cls, data, "config").validate()


def _validate_distillation(lc: "LossConfig") -> None:
    for name in ("momentum", "distill_alpha"):
        value = getattr(lc, name)
        if not is_number(value):
            raise ValueError(f"losses.{name} must be a number, got {value!r}")
    if not 0.0 <= lc.momentum < 1.0:
        raise ValueError(f"losses.momentum must be in [0, 1), got {lc.momentum}")
    if not 0.0 <= lc.distill_alpha <= 1.0:
        raise ValueError(f"losses.distill_alpha must be in [0, 1], got {lc.distill_alpha}")
    for name in ("queue_size", "alpha_ramp_steps"):
        value = getattr(lc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "queue_size" else 0):
            raise ValueError(f"losses.{name} must be an int >= {1 if name == 'queue_size' else 0}, got {value!r}")
    if lc.itc_image not in ITC_IMAGE:
        raise ValueError(f"losses.itc_image must be one of {ITC_IMAGE}, got {lc.itc_image!r}")
    if lc.prefix_split not in ("none", "random"):
        raise ValueError(f"losses.prefix_split must be 'none' or 'random', got {lc.prefix_split!r}")


def _validate_schedule(s: "SelectionConfig", v: VisionConfig) -> None:
    """Policy-specific schedule checks: ELIP's look-ahead spans, ToMe's merge counts."""
    from bus_kernels import max_merge

    from .selection import keep_count, keep_rule

    if s.lookahead:
        if len(s.lookahead) != len(s.layers):
            raise ValueError(
                f"selection.lookahead ({list(s.lookahead)}) must have one entry per selection.layers ({list(s.layers)})"
            )
        for i, n in zip(s.layers, s.lookahead):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1 or i + n > v.depth:
                raise ValueError(
                    f"selection.lookahead must be ints >= 1 with layer + lookahead <= vision.depth ({v.depth}), "
                    f"got {list(s.lookahead)} for layers {list(s.layers)}"
                )
    if s.policy in ("random", "tome") and s.keep_mode != "ratio":
        raise ValueError(f"selection.keep_mode must be 'ratio' for policy {s.policy!r} (it has no scores to weigh)")
    if isinstance(s.tome_r, bool) or not isinstance(s.tome_r, int) or s.tome_r < 0:
        raise ValueError(f"selection.tome_r must be an int >= 0, got {s.tome_r!r}")
    if s.policy == "tome" and len(s.layers) == len(s.keep_ratios):
        n = (v.image_size // v.patch_size) ** 2  # candidates left
        ratio_of, rounding = keep_rule(s.policy, s.ratio_of, s.keep_rounding)
        for i, ratio in zip(s.layers, s.keep_ratios):
            if not is_number(ratio) or not 0.0 < ratio <= 1.0:
                return  # the keep_ratios check reports it
            r = s.tome_r or n - keep_count(ratio, n, (v.image_size // v.patch_size) ** 2, ratio_of, rounding)
            limit = max_merge(n + 1, 1)
            if r > limit:
                field = "selection.tome_r" if s.tome_r else "selection.keep_ratios"
                raise ValueError(
                    f"{field}: ToMe at layer {i} would merge {r} of the {n} tokens left, but one bipartite step "
                    f"merges at most {limit} (half of them)"
                )
            n -= r


_SECTIONS = {"vision": VisionConfig, "selection": SelectionConfig, "text": TextConfig, "pad": PadConfig, "losses": LossConfig}


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field(s) in {where}: {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if cls is BusConfig and key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, f"{where}.{key}")
        elif key in ("layers", "keep_ratios", "lookahead"):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``overrides`` to a config dict: ``{"selection": {"policy": "evit"}}`` or the flat form
    ``{"selection__policy": "evit"}`` both set one nested field."""
    out = json.loads(json.dumps(data))
    for key, value in overrides.items():
        if "__" in key:
            section, sub = key.split("__", 1)
            value, key = {sub: value}, section
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def list_config_names() -> list[str]:
    """Names of the JSON configs shipped in ``bus_model/configs``."""
    files = resources.files("bus_model").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_config_dict(name: str) -> dict[str, Any]:
    names = list_config_names()
    if name not in names:
        raise ValueError(f"unknown model name {name!r}; available: {names}")
    text = resources.files("bus_model").joinpath("configs", f"{name}.json").read_text()
    data = json.loads(text)
    data["name"] = name
    return data


def get_config(name: str, **overrides: Any) -> BusConfig:
    """The named config with ``overrides`` applied (see ``merge_overrides``)."""
    return BusConfig.from_dict(merge_overrides(load_config_dict(name), overrides))
