"""Wan2.2 A14B: two Wan2.1-shaped DiTs over one sampling run, switched by timestep.

A high-noise expert denoises while the timestep is at or above `boundary * 1000`, the low-noise
expert after it (Wan-Video/Wan2.2 wan/text2video.py and image2video.py,
`_prepare_model_for_timestep`: `t.item() >= boundary`; diffusers' WanPipeline and
WanImageToVideoPipeline: `t >= boundary_ratio * num_train_timesteps` runs `transformer`, else
`transformer_2`). Each expert has its own guidance scale. The two experts have the same
architecture, so one jitted step program serves both (their weights are arguments, not
constants).

Sampling defaults, from the original's configs (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py;
their `sample_guide_scale` tuples are ordered (low noise, high noise), ours (high, low) as
diffusers' guidance_scale / guidance_scale_2):

| task | boundary | guidance high, low | shift | steps |
|---|---|---|---|---|
| T2V-A14B | 0.875 | 4.0, 3.0 | 12.0 | 40 |
| I2V-A14B | 0.900 | 3.5, 3.5 | 5.0 | 40 |

The boundary is stored in a diffusers checkpoint (model_index.json `boundary_ratio`); the
original layout stores none of these (they live in the code), so its converter takes them from
this table by task.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.wan.sampler import NUM_TRAIN_TIMESTEPS

HIGH_NOISE, LOW_NOISE = 0, 1  # expert indices: Components.dit, Components.low_noise_dit


@dataclasses.dataclass(frozen=True)
class ExpertSwitch:
    """When a two-expert (Wan2.2 A14B) sampler hands over, and its default sampling settings.

    boundary: fraction of the 1000 training timesteps; the high-noise expert runs while the
      step's timestep >= boundary * 1000, the low-noise expert after.
    guidance: default guidance scales (high-noise expert, low-noise expert).
    shift, steps: default flow shift and step count.
    """

    boundary: float
    guidance: tuple[float, float]
    shift: float
    steps: int

    def __post_init__(self):
        object.__setattr__(self, "guidance", tuple(float(g) for g in self.guidance))
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"boundary={self.boundary} must be in (0, 1): a fraction of the training timesteps")
        if len(self.guidance) != 2 or min(self.guidance) < 0:
            raise ValueError(f"guidance={self.guidance} must be two scales >= 0 (high-noise, low-noise expert)")
        if self.shift <= 0 or self.steps < 1:
            raise ValueError(f"shift={self.shift} must be > 0 and steps={self.steps} >= 1")

    @property
    def boundary_timestep(self) -> float:
        """Returns the first timestep that is not the high-noise expert's, boundary * 1000."""
        return self.boundary * NUM_TRAIN_TIMESTEPS

    def experts(self, timesteps: np.ndarray) -> np.ndarray:
        """Returns the expert of each step, int [steps]: HIGH_NOISE where timestep >= the
        boundary timestep, else LOW_NOISE (compared in float64, as Python compares the
        originals' integer timesteps with the float boundary)."""
        high = np.asarray(timesteps, np.float64) >= self.boundary_timestep
        return np.where(high, HIGH_NOISE, LOW_NOISE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ExpertSwitch":
        """Returns the switch from `to_dict` output (JSON gives guidance as a list: made a tuple)."""
        return cls(**{**fields, "guidance": tuple(fields["guidance"])})


WAN22_T2V_A14B = ExpertSwitch(boundary=0.875, guidance=(4.0, 3.0), shift=12.0, steps=40)
WAN22_I2V_A14B = ExpertSwitch(boundary=0.900, guidance=(3.5, 3.5), shift=5.0, steps=40)
EXPERT_PRESETS = {"t2v": WAN22_T2V_A14B, "i2v": WAN22_I2V_A14B}


def expert_guidance(switch: ExpertSwitch, guidance: float | None, guidance_low: float | None) -> tuple[float, float]:
    """Returns the (high-noise, low-noise) guidance scales: the switch's defaults where None is
    given; a lone `guidance` serves both experts, as the original's float guide_scale and
    diffusers' guidance_scale_2=None do."""
    if guidance is None:
        return (switch.guidance[0], switch.guidance[1] if guidance_low is None else guidance_low)
    return (guidance, guidance if guidance_low is None else guidance_low)
