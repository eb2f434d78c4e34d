"""bus_model: the BUS vision-language pre-training stack (arXiv 2307.08504) built on bus_kernels.

    list_models()                       -> names of the shipped configs (each with a "-baseline" twin)
    create_model(name, **overrides)     -> BusModel (random init)
    BusModel.from_pretrained(dir)       /  model.save_pretrained(dir)   (safetensors + JSON)
    BusViT.from_timm(vit, policy=...)   -> the vision tower with a timm ViT's weights
    get_config(name, **overrides)       -> BusConfig

Training-only dependencies are not imported here.
"""

from .config import (
    BusConfig,
    LossConfig,
    PadConfig,
    SelectionConfig,
    TextConfig,
    VisionConfig,
    get_config,
    list_config_names,
)
from .model import BusModel, BusOutput, ImageEncoding, TextEncoding
from .vision import BusViT, VisionFeatures


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return list_config_names()


def create_model(name: str, **overrides) -> BusModel:
    """Build the named model with random weights. ``overrides`` set config fields, nested as a dict
    (``selection={"policy": "evit"}``) or flat with ``__`` (``selection__policy="evit"``)."""
    return BusModel(get_config(name, **overrides))


__all__ = [
    "BusConfig", "BusModel", "BusOutput", "BusViT", "ImageEncoding", "LossConfig", "PadConfig",
    "SelectionConfig", "TextConfig", "TextEncoding", "VisionConfig", "VisionFeatures",
    "create_model", "get_config", "list_models",
]
