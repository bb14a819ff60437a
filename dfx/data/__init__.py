"""Datasets: embedded synthetic data, ImageFolder classification, and their transforms."""

from dfx.data.cache import dfx_home
from dfx.data.embedded import EMBEDDED, embedded_root

__all__ = ["EMBEDDED", "dfx_home", "embedded_root"]
