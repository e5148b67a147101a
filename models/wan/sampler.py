"""Flow-matching samplers for Wan2.1: UniPC multistep (bh2, order 2, as Wan samples) and Euler.

The model predicts the flow v = noise - x0 at noise level sigma (x_sigma = (1 - sigma) x0 +
sigma noise); the DiT is called with the timestep `sampler.timesteps[i]` (sigma * 1000,
truncated to an integer as Wan's scheduler does). Everything that depends only on the schedule
(sigmas, timesteps, and UniPC's per-step predictor/corrector weights) is computed in numpy up
front, so `step(state, model_output) -> state` is a few fused multiply-adds, pure and usable
under jit, lax.fori_loop or a Python loop, with the step index in the state. Deterministic:
the only randomness is the initial noise, from a seed.

UniPC (Zhao et al. 2023) as Wan2.1's wan/utils/fm_solvers_unipc.py (FlowUniPCMultistepScheduler
with shift=1, set_timesteps(steps, shift=shift); the same update as diffusers'
UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")): predict
x0 = x - sigma v, correct the previous step with UniC (order = the previous predictor's),
then predict with UniP of order min(2, steps left, steps done + 1); bh2: B(h) = expm1(-h).
Its weights are folded into per-step coefficients of (x, last x, past x0s, x0) in float64,
then cast to float32; diffusers evaluates the same formulas in float32 (differences ~1e-6).

Schedules: `schedule="wan"` (default) is the original's: sigmas = shift(linspace(0.999, 0,
steps + 1)[:-1]), 0.999 = 1 - 1/1000 being its training sigma_max. `schedule="diffusers"` is
diffusers' use_flow_sigmas grid: shift(linspace(1, 0.001, steps + 1)[:-1]), first sigma
1 - 1e-6. They differ by 0.001 before the shift: at shift 5 and 50 steps by up to 0.0043 in
sigma (the last nonzero sigma is 0.0925 vs 0.0968); both end at sigma 0. Timesteps follow.
Default shift: 5.0 at 720p and 3.0 at 480p, the Wan README's (and diffusers') recommendation;
Wan's generate.py uses 5.0 for T2V at every size.

Step-distilled models (LightX2V's 4-step Wan2.1 LoRAs and models) run at the fixed training
timesteps they were distilled on: `distilled_sampler(LIGHTX2V_TIMESTEPS, shift=5.0)`, as
LightX2V's WanStepDistillScheduler (lightx2v/models/schedulers/wan/step_distill/scheduler.py;
configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json: denoising_step_list [1000, 750, 500,
250], sample_shift 5): sigma = shift(t / 1000), the model sees sigma * 1000 unrounded, and each
step predicts x0 = x - sigma v and re-noises it to the next sigma with the predicted noise
x + (1 - sigma) v. That "LCM" step is algebraically flow Euler, x + (sigma_next - sigma) v, which
is what runs here; the last step lands on sigma 0.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

NUM_TRAIN_TIMESTEPS = 1000  # Wan's scheduler: timestep = sigma * 1000
DEFAULT_STEPS = 50  # T2V; Wan's generate.py uses 40 for I2V
SCHEDULES = ("wan", "diffusers")
LIGHTX2V_TIMESTEPS = (1000, 750, 500, 250)  # LightX2V's denoising_step_list for its 4-step Wan2.1 distillation


class SamplerState(NamedTuple):
    """A pytree; `sample` is the current x, [B, F, H, W, C] (any shape) float32."""

    sample: jax.Array
    step: jax.Array  # int32 scalar: steps taken
    last_sample: jax.Array | None  # UniPC: x before the previous predictor (the corrector's start)
    history: jax.Array | None  # UniPC: the x0 predictions of the last `order` steps, oldest first


def default_shift(height: int, width: int) -> float:
    """Returns Wan's recommended flow shift for a video size: 5.0 at 720p, 3.0 at 480p."""
    return 5.0 if min(height, width) >= 720 else 3.0


def flow_sigmas(num_steps: int, shift: float, schedule: str = "wan") -> tuple[np.ndarray, np.ndarray]:
    """Returns (sigmas float32 [steps + 1] ending at 0, timesteps float32 [steps] for the model).

    Timesteps are sigma * 1000 truncated to integers (Wan and diffusers cast them to int64).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if shift <= 0:
        raise ValueError(f"shift={shift} must be positive")
    if schedule == "wan":  # float32 training sigma_max, read back as a Python float, as the original
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
        sigmas = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
    elif schedule == "diffusers":
        sigmas = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
    else:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if schedule == "diffusers" and abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
    timesteps = np.trunc(sigmas * NUM_TRAIN_TIMESTEPS).astype(np.float32)
    return np.append(sigmas, 0.0).astype(np.float32), timesteps


def distilled_sigmas(train_timesteps: Sequence[float | int], shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (sigmas float32 [n + 1] ending at 0, timesteps float32 [n]) at a distilled model's
    fixed training timesteps (in (0, 1000], decreasing): sigma = shift(t / 1000), timestep =
    sigma * 1000, not rounded (LightX2V feeds the model these floats)."""
    t = np.asarray(train_timesteps, np.float64)
    if t.ndim != 1 or not len(t) or np.any(t <= 0) or np.any(t > NUM_TRAIN_TIMESTEPS) or np.any(np.diff(t) >= 0):
        raise ValueError(f"timesteps={list(train_timesteps)} must be decreasing values in (0, {NUM_TRAIN_TIMESTEPS}], "
                         f"e.g. {list(LIGHTX2V_TIMESTEPS)}")  # fmt: skip
    if shift <= 0:
        raise ValueError(f"shift={shift} must be positive")
    sigmas = t / NUM_TRAIN_TIMESTEPS
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.append(sigmas, 0.0).astype(np.float32), (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.float32)


def cfg(cond: Float[Array, "..."], uncond: Float[Array, "..."], scale: float | Float[Array, ""]) -> Float[Array, "..."]:
    """Returns classifier-free guidance uncond + scale * (cond - uncond), in the inputs' dtype; scale: a
    number or a float32 scalar array (traced, so one compiled step serves every guidance)."""
    return uncond + scale * (cond - uncond)


def initial_noise(seed: int, shape: tuple[int, ...]) -> Float[Array, "..."]:
    """Returns the starting latents, standard normal float32 of `shape`, from an integer seed."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowEuler:
    """Plain flow Euler: x <- x + (sigma_next - sigma) v."""

    sigmas: np.ndarray  # float32 [steps + 1]
    timesteps: np.ndarray  # float32 [steps]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init(self, noise: jax.Array) -> SamplerState:
        return SamplerState(noise.astype(jnp.float32), jnp.zeros((), jnp.int32), None, None)

    def timestep(self, state: SamplerState) -> jax.Array:
        """Returns the model's timestep at this step, a float32 scalar."""
        return jnp.asarray(self.timesteps)[state.step]

    def step(self, state: SamplerState, model_output: jax.Array) -> SamplerState:
        sigmas = jnp.asarray(self.sigmas)
        velocity = model_output.astype(state.sample.dtype)
        sample = state.sample + (sigmas[state.step + 1] - sigmas[state.step]) * velocity
        return state._replace(sample=sample, step=state.step + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowUniPC(FlowEuler):
    """UniPC multistep on flow predictions; weights per step in `corrector` and `predictor`."""

    order: int = 2
    corrector: np.ndarray | None = None  # float32 [steps, order + 3]: (x, last x, past x0s..., x0)
    predictor: np.ndarray | None = None  # float32 [steps, order + 1]: (corrected x, x0s incl. this one...)

    def init(self, noise: jax.Array) -> SamplerState:
        sample = noise.astype(jnp.float32)
        history = jnp.zeros((self.order, *sample.shape), sample.dtype)
        return SamplerState(sample, jnp.zeros((), jnp.int32), jnp.zeros_like(sample), history)

    def step(self, state: SamplerState, model_output: jax.Array) -> SamplerState:
        i = state.step
        x0 = state.sample - jnp.asarray(self.sigmas)[i] * model_output.astype(state.sample.dtype)
        c = jnp.asarray(self.corrector)[i]
        corrected = (c[0] * state.sample + c[1] * state.last_sample
                     + jnp.einsum("k,k...->...", c[2:-1], state.history) + c[-1] * x0)  # fmt: skip
        history = jnp.concatenate([state.history[1:], x0[None]])
        p = jnp.asarray(self.predictor)[i]
        sample = p[0] * corrected + jnp.einsum("k,k...->...", p[1:], history)
        return SamplerState(sample, i + 1, corrected, history)


def euler_sampler(num_steps: int = DEFAULT_STEPS, shift: float = 5.0, schedule: str = "wan") -> FlowEuler:
    """Returns a flow Euler sampler over the given schedule (see flow_sigmas)."""
    return FlowEuler(*flow_sigmas(num_steps, shift, schedule))


def distilled_sampler(train_timesteps: Sequence[float | int] = LIGHTX2V_TIMESTEPS, shift: float = 5.0) -> FlowEuler:
    """Returns the sampler of a step-distilled model: flow Euler at its training timesteps (see
    distilled_sigmas), LightX2V's 4-step schedule by default."""
    return FlowEuler(*distilled_sigmas(train_timesteps, shift))


def unipc_sampler(
    num_steps: int = DEFAULT_STEPS, shift: float = 5.0, schedule: str = "wan", *, order: int = 2,
    solver_type: str = "bh2", lower_order_final: bool = True,
) -> FlowUniPC:  # fmt: skip
    """Returns Wan's UniPC sampler (order 2, bh2, lower order on the final steps by default)."""
    if order < 1 or solver_type not in ("bh1", "bh2"):
        raise ValueError(f"order={order} must be >= 1 and solver_type={solver_type!r} 'bh1' or 'bh2'")
    sigmas, timesteps = flow_sigmas(num_steps, shift, schedule)
    corrector, predictor = _unipc_weights(sigmas, order, solver_type, lower_order_final)
    return FlowUniPC(sigmas, timesteps, order, corrector, predictor)


def _unipc_weights(sigmas: np.ndarray, order: int, solver_type: str, lower_order_final: bool):
    """Returns (corrector [N, order + 3], predictor [N, order + 1]) float32 per-step weights."""
    sigma = sigmas.astype(np.float64)
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, handled by expm1(-inf)
        lam = np.log1p(-sigma) - np.log(sigma)
    n = len(sigmas) - 1
    orders = [min(order, n - i if lower_order_final else order, i + 1) for i in range(n)]
    corrector = np.zeros((n, order + 3))
    predictor = np.zeros((n, order + 1))
    for i in range(n):
        corrector[i, 0] = 1.0  # step 0: no corrector, x passes through
        if i > 0:  # UniC from sigma[i-1] to sigma[i] with the previous predictor's order
            o = orders[i - 1]
            x_w, m_w, model_w = _bh_weights(lam, sigma, i - 1, i, o, solver_type, corrector=True)
            corrector[i, 0] = 0.0
            corrector[i, 1] = x_w
            corrector[i, 2 + order - o : 2 + order] = m_w  # m_{i-o} ... m_{i-1}
            corrector[i, -1] = model_w
        x_w, m_w, _ = _bh_weights(lam, sigma, i, i + 1, orders[i], solver_type, corrector=False)
        predictor[i, 0] = x_w
        predictor[i, 1 + order - orders[i] :] = m_w  # m_{i-o+1} ... m_i
    return corrector.astype(np.float32), predictor.astype(np.float32)


def _bh_weights(lam, sigma, s0: int, t: int, o: int, solver_type: str, *, corrector: bool):
    """Returns (weight of x, weights of x0 at steps s0-o+1 .. s0 oldest first, weight of the new x0)
    of one UniP (corrector=False) or UniC step of order o from sigma[s0] to sigma[t]."""
    alpha_t, sigma_t, sigma_s0 = 1.0 - sigma[t], sigma[t], sigma[s0]
    h = lam[t] - lam[s0]
    hh = -h  # predict_x0
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if solver_type == "bh2" else hh
    # rk of an earlier x0 m_{s0-k}: its lambda distance from s0's in units of h.
    rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, o)]
    if corrector:
        rhos = [0.5] if o == 1 else _solve_rhos(rks + [1.0], hh, h_phi_1, b_h, o)
    else:
        # Wan and diffusers fix rho = 0.5 at order 2; higher orders solve R[:-1, :-1] rho = b[:-1].
        rhos = [0.5] if o == 2 else (_solve_rhos(rks, hh, h_phi_1, b_h, o) if o > 2 else [])
    # x_t = sigma_t / sigma_s0 x - alpha_t h_phi_1 m0 - alpha_t B(h) (sum_k rho_k D_k [+ rho_t D_t]),
    # expanded into one weight per x0.
    m0 = -alpha_t * h_phi_1
    earlier = []  # D_k = (m_{s0-k} - m0) / r_k
    for k in range(o - 1):
        m0 += alpha_t * b_h * rhos[k] / rks[k]
        earlier.append(-alpha_t * b_h * rhos[k] / rks[k])
    model_t = 0.0
    if corrector:  # D_t = model_t - m0 with the last rho
        m0 += alpha_t * b_h * rhos[-1]
        model_t = -alpha_t * b_h * rhos[-1]
    return sigma_t / sigma_s0, [*earlier[::-1], m0], model_t


def _solve_rhos(rks: list[float], hh: float, h_phi_1: float, b_h: float, o: int) -> list[float]:
    """Returns UniPC's rhos solving the leading len(rks) rows of R rho = b, R[i] = rks ** i and b
    from the phi functions; rks ends in 1.0 for UniC (the full system), not for UniP."""
    h_phi_k = h_phi_1 / hh - 1
    factorial, rows, b = 1, [], []
    for i in range(1, o + 1):
        rows.append(np.asarray(rks) ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    size = len(rks)
    return list(np.linalg.solve(np.stack(rows)[:size, :size], np.asarray(b)[:size]))
