"""Expedit token clustering and reconstruction: run a pretrained ViT's later layers on fewer tokens."""

from dfx.cluster.wrapper import HourglassConfig, HourglassViT, cluster_grid, hourglass
from dfx.cluster.tokens import token_clustering, token_reconstruction

__all__ = [
    "HourglassConfig",
    "HourglassViT",
    "cluster_grid",
    "hourglass",
    "token_clustering",
    "token_reconstruction",
]
