"""Expedit token clustering and reconstruction: run a pretrained ViT's later layers on fewer tokens."""

from dfx.cluster.tokens import token_clustering, token_reconstruction

__all__ = ["token_clustering", "token_reconstruction"]
