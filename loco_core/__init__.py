"""LOCO engine: pure-torch math for local low-rank edits of diffusion models.

Nothing in this package imports ComfyUI. A denoiser is any callable
D(x, sigma) returning the posterior-mean (x0) estimate (see denoiser.py).
"""

from .denoiser import Denoiser
from .directions import DirectionSet, compose, find_directions, transfer
from .errors import JacobianError, LocoError
from .jacobian import JacobianProducts, saveable_weights
from .locality import leakage, project_out
from .sampling import apply_direction, decode, invert, ode_step
from .schedules import DiscreteVPSchedule, SIGMA_FLOOR, alpha_bar_to_sigma, level_grid, sigma_to_alpha_bar, vp_alphas_cumprod
from .subspace import ConvergenceRecord, MaskedSubspace, masked_subspace, principal_angle_sine
from .tloco import pull_back, text_change, text_direction

__all__ = [
    "ConvergenceRecord",
    "Denoiser",
    "DirectionSet",
    "DiscreteVPSchedule",
    "JacobianError",
    "JacobianProducts",
    "LocoError",
    "MaskedSubspace",
    "SIGMA_FLOOR",
    "alpha_bar_to_sigma",
    "apply_direction",
    "compose",
    "decode",
    "find_directions",
    "invert",
    "leakage",
    "level_grid",
    "masked_subspace",
    "ode_step",
    "principal_angle_sine",
    "project_out",
    "pull_back",
    "saveable_weights",
    "sigma_to_alpha_bar",
    "text_change",
    "text_direction",
    "transfer",
    "vp_alphas_cumprod",
]
