"""Wan2.1 in Flax NNX: the diffusion transformer (T2V, I2V) with radial self-attention."""

from models.wan.config import (
    PRESETS,
    WAN_I2V_14B,
    WAN_T2V_14B,
    WAN_T2V_1_3B,
    WAN_TINY,
    WanConfig,
)
from models.wan.transformer import WanModel

__all__ = [
    "PRESETS",
    "WAN_I2V_14B",
    "WAN_T2V_14B",
    "WAN_T2V_1_3B",
    "WAN_TINY",
    "WanConfig",
    "WanModel",
]
