"""Kernels shared by the models, written in plain PyTorch (no compiled extension)."""

from dfx.ops.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
