"""Multi-modal fusion: GeminiFusion, its baselines, the dual-modality MiT backbone and the SegFormer head."""

from dfx.fusion.gemini import GeminiFusion
from dfx.fusion.mit import MIT_VARIANTS, MultiModalMiT, load_mit_weights
from dfx.fusion.segformer import FusionSegmenter, SegFormerHead
from dfx.fusion.strategies import FUSIONS, CrossModalAttention, ModalityMerge, TokenExchange, build_fusion

__all__ = ["FUSIONS", "MIT_VARIANTS", "CrossModalAttention", "FusionSegmenter", "GeminiFusion", "ModalityMerge",
           "MultiModalMiT", "SegFormerHead", "TokenExchange", "build_fusion", "load_mit_weights"]
