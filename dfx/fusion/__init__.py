"""Multi-modal fusion layers for dual-stream vision transformers."""

from dfx.fusion.gemini import GeminiFusion

__all__ = ["GeminiFusion"]
