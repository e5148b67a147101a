"""Wan2.1 DiT hyperparameters (WanConfig, presets): the architecture only.

Field names follow the original Wan2.1 `WanModel` (dim, ffn_dim, in_dim, ...) so a checkpoint's
config.json reads straight into them. How attention is computed (radial_jax.RadialPlan) and
rematerialisation are run-time choices passed to the model's call, not fields here.
"""

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

# Fields older converted config.json files carry; run-time choices now, ignored with a warning.
RUNTIME_FIELDS = ("attention", "remat")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_TYPES = ("t2v", "i2v")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Wan2.1 diffusion transformer (original field names; see wan/modules/model.py).

    param_dtype: storage of the large matmul weights (bfloat16 for real runs); dtype: their
    compute dtype. Norms, modulation, the time embedding, the head and the residual stream stay
    float32, as in the original (it runs those under float32 autocast).
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # CLIP feature width, used by model_type "i2v" only; None: no CLIP image embedding, the image
    # enters through y alone (Wan2.2 I2V-A14B, whose DiT has no img_emb).
    img_dim: int | None = 1280
    rope_theta: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} must be one of {MODEL_TYPES} (flf2v/vace: not ported)")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into num_heads={self.num_heads} heads of even width")
        if self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} too small for the 3-axis RoPE split (>= 6)")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {DTYPES}")
        if not (self.qk_norm and self.cross_attn_norm):
            raise ValueError("qk_norm=False / cross_attn_norm=False: no Wan2.1 checkpoint uses them; not ported")

    @property
    def uses_clip(self) -> bool:
        """Whether the model takes CLIP image features (Wan2.1 I2V; not Wan2.2 I2V-A14B)."""
        return self.model_type == "i2v" and self.img_dim is not None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (config.json of our checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "WanConfig":
        """Returns the config from `to_dict` output; unknown keys are an error, the run-time
        fields older files carry (attention, remat) are dropped with a one-line warning."""
        fields = dict(fields)
        stale = [name for name in RUNTIME_FIELDS if fields.pop(name, None) is not None]
        if stale:
            warnings.warn(f"config.json: ignoring {', '.join(stale)} (run-time choices now: pass plan=/remat= to "
                          "the model's call, or --attention to `radial-jax generate`)", stacklevel=2)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown WanConfig fields {sorted(unknown)}")
        return cls(**fields)


WAN_T2V_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# in_dim 36 = 16 noisy latent channels + 4 mask channels + 16 channels of the encoded first frame.
WAN_I2V_14B = WanConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# Wan2.2 A14B: each of the two experts (models/wan/experts.py) is a Wan2.1 14B; I2V without CLIP.
WAN22_T2V_A14B = WAN_T2V_14B
WAN22_I2V_A14B = dataclasses.replace(WAN_I2V_14B, img_dim=None)
# Tests and the offline demo: the same network, a few layers wide enough to exercise every path.
WAN_TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=32, in_dim=4,
                     out_dim=4, img_dim=24)

PRESETS = {
    "t2v-1.3B": WAN_T2V_1_3B,
    "t2v-14B": WAN_T2V_14B,
    "i2v-14B": WAN_I2V_14B,
    "i2v-A14B": WAN22_I2V_A14B,
    "tiny": WAN_TINY,
}
