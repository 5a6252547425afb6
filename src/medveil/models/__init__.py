"""Models: ViT encoder (timm / MAE key layout) and the MAE pretraining wrapper."""

from medveil.models.mae import MaskedAutoencoderViT
from medveil.models.vit import ViTConfig, VisionTransformer

__all__ = ["MaskedAutoencoderViT", "ViTConfig", "VisionTransformer"]
