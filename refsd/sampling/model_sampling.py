"""Model sampling: the noise levels a diffusion model was trained on, and how its output becomes x0.

refsd samples in the k-diffusion ("variance exploding") parameterisation: a latent at noise level
sigma is ``x = x0 + sigma * noise``. A DDPM trained on ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
sees the same thing scaled: ``x = x_t / sqrt(abar_t)``, ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
The network therefore gets ``c_in * x`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` and a timestep found
from sigma, and its output becomes a denoised estimate (Karras et al. 2022, Table 1; sigma_data = 1):

    eps-prediction:  D = x - sigma * eps_hat
    v-prediction:    D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v_hat
    flow (CONST):    D = x - sigma * v_hat,  x = (1 - sigma) x0 + sigma * noise,  c_in = 1

Tables (betas, cumulative alphas, sigmas) are built once on the host in float64 Python arithmetic,
so every backend holds bit-identical tables, then placed on ``like``'s device in float64 where
the device has it (float32 otherwise, e.g. torch-MPS).

ComfyUI holds the same table as float32 buffers and computes in float32, and where a result picks an
integer (the timestep nearest a sigma at t = k + 0.5) float64 can pick the other one. So the rounded
timestep lookup is ComfyUI's float32 one, and ``sigma_f32`` / ``timestep_f32`` / ``host_sigmas_f32``
restate its float32 arithmetic on the host for the schedules of parity="comfyui", with the
float32-exact helpers of refsd.numerics (f32, linspace_f32; the rounding argument is stated there).

References (ported, not copied):
- ComfyUI comfy/model_sampling.py: EPS, V_PREDICTION, CONST, ModelSamplingDiscrete (timestep,
  sigma, percent_to_sigma), ModelSamplingDiscreteFlow, time_snr_shift, ModelSamplingFlux,
  flux_time_shift (Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832);
  comfy_extras/nodes_model_advanced.py ModelSamplingSD3 (shift 3.0), ModelSamplingFlux (the shift from
  width / height: ``flux_shift``);
- diffusers 0.42.1 pipelines/flux/pipeline_flux.py calculate_shift (``calculate_shift``: the same line
  in image-sequence length) and schedulers/scheduling_flow_match_euler_discrete.py time_shift;
  comfy_extras/nodes_model_advanced.py and model_sampling.py rescale_zero_terminal_snr_sigmas;
  comfy/ldm/modules/diffusionmodules/util.py make_beta_schedule.
- k-diffusion 0.1.1 k_diffusion/external.py DiscreteSchedule.sigma_to_t / t_to_sigma (continuous t).
- diffusers 0.42.1 schedulers/scheduling_euler_discrete.py (beta schedules, rescale_zero_terminal_snr).
- Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Algorithm 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.numerics import f32, linspace_f32, linspace_host  # noqa: F401  (re-exported: schedules, tests)

# diffusers prediction_type -> ComfyUI's name for the parameterisation.
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}

# diffusers beta_schedule names. NB ComfyUI's make_beta_schedule calls the first one "linear" and the
# second "sqrt_linear": refsd keeps diffusers' names because configs carry them.
BETA_SCHEDULES = ("scaled_linear", "linear")

# Zero terminal SNR makes the last alpha_cumprod exactly 0 (sigma = inf). Both references replace it
# with a tiny value so the largest sigma is finite: ComfyUI (rescale_zero_terminal_snr_sigmas) uses
# 4.8973451890853435e-08 (sigma_max ~ 4518.8); diffusers' Euler-family schedulers use 2**-24, the
# smallest float16 subnormal (sigma_max ~ 4096). refsd follows ComfyUI unless told otherwise.
ZSNR_TERMINAL_ALPHAS_CUMPROD = {"comfyui": 4.8973451890853435e-08, "diffusers": 2.0 ** -24}

# Defaults for keys a config leaves out: Stable Diffusion 1.x/2.x/XL's values, which are also
# ComfyUI's defaults. (diffusers' scheduler classes default to linear 1e-4..2e-2; real SD
# scheduler_config.json files always spell the values out.)
CONFIG_DEFAULTS = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
}


# --------------------------------------------------------------------------------------------
# host-side helpers (Python floats: a 1000-entry table costs nothing and is identical everywhere)


def time_snr_shift(shift: float, t: float) -> float:
    """Shift a flow time t in [0, 1] towards noise: shift * t / (1 + (shift - 1) t) (SD3 eq. 23)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def time_snr_shift_f32(shift: float, t: float) -> float:
    """time_snr_shift on a float32 t in float32 arithmetic (shift and shift - 1 rounded to float32 as
    Python scalars meeting float32 tensors / arrays, every operation rounded once): ComfyUI's
    ModelSamplingDiscreteFlow.sigma on its float32 buffer and diffusers' FlowMatchEulerDiscreteScheduler
    shift (torch in __init__, NumPy float32 in set_timesteps) compute exactly this."""
    return f32(f32(f32(shift) * t) / f32(1.0 + f32(f32(shift - 1.0) * t)))


def flux_time_shift(mu: float, t: float, sigma: float = 1.0) -> float:
    """Flux's resolution-dependent shift of a flow time t in (0, 1]: e^mu / (e^mu + (1/t - 1)^sigma)
    (ComfyUI flux_time_shift; diffusers FlowMatchEulerDiscreteScheduler._time_shift_exponential).
    mu = log(shift) makes it time_snr_shift(shift, t) when sigma = 1."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0) ** sigma)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for Flux's dynamic shift: the line through (base_seq_len, base_shift) and (max_seq_len,
    max_shift) at ``image_seq_len`` (the packed latent's token count, (h/2)(w/2) for latents h x w).
    diffusers pipelines/flux/pipeline_flux.py calculate_shift, in its operation order."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_shift(width: int, height: int, *, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """ComfyUI's ModelSamplingFlux node: mu from the image size in pixels, the same line as
    ``calculate_shift`` with image_seq_len = width * height / (8 * 8 * 2 * 2) (VAE factor 8, 2x2
    packing), computed in the node's operation order (comfy_extras/nodes_model_advanced.py)."""
    x1, x2 = 256, 4096
    mm = (max_shift - base_shift) / (x2 - x1)
    b = base_shift - mm * x1
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


def _betas(config: dict) -> list[float]:
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = [float(b) for b in config["trained_betas"]]
        if len(betas) != n:
            raise RefsdError(f"trained_betas has {len(betas)} entries, num_train_timesteps is {n}")
        return betas
    schedule, b0, b1 = config["beta_schedule"], float(config["beta_start"]), float(config["beta_end"])
    if schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return [v * v for v in linspace_host(math.sqrt(b0), math.sqrt(b1), n)]
    if schedule == "linear":
        return linspace_host(b0, b1, n)
    raise RefsdError(f"beta_schedule {schedule!r} is not supported; valid: {', '.join(BETA_SCHEDULES)}")


def _cumprod(values: Sequence[float]) -> list[float]:
    out, acc = [], 1.0
    for v in values:
        acc *= v
        out.append(acc)
    return out


def rescale_zero_terminal_snr(alphas_cumprod: Sequence[float], terminal: float) -> list[float]:
    """Lin et al. 2023, Algorithm 1, on the cumulative alphas: shift sqrt(abar) so the last is 0 and
    rescale so the first is unchanged; then replace the final 0 by ``terminal`` (sigma < inf).

    ComfyUI does this on sigmas (abar = 1 / (sigma^2 + 1)), diffusers on betas (abar -> betas ->
    cumprod again); all three agree to float rounding (tests/test_model_sampling.py).
    """
    s = [math.sqrt(a) for a in alphas_cumprod]
    s0, sT = s[0], s[-1]
    s = [(v - sT) * (s0 / (s0 - sT)) for v in s]
    out = [v * v for v in s]
    out[-1] = float(terminal)
    return out


def _table_dtype(like):
    """float64 where ``like``'s device supports it (the Array API's own per-device query), else float32."""
    xp = rxp.namespace(like)
    floats = xp.__array_namespace_info__().dtypes(device=rxp.device(like), kind="real floating")
    return floats.get("float64", floats["float32"])


def broadcast_sigma(sigma, x):
    """sigma as an array that broadcasts against x: 0-d stays 0-d, (B,) becomes (B, 1, ..., 1).

    Python numbers are accepted. The result is in x's dtype: arithmetic runs in the sample's dtype.
    """
    xp = rxp.namespace(x)
    if not hasattr(sigma, "shape"):
        return xp.asarray(float(sigma), dtype=x.dtype, device=rxp.device(x))
    if sigma.dtype != x.dtype:
        sigma = xp.astype(sigma, x.dtype)
    if sigma.ndim == 1 and x.ndim > 1:
        sigma = xp.reshape(sigma, (sigma.shape[0],) + (1,) * (x.ndim - 1))
    return sigma


# --------------------------------------------------------------------------------------------
# discrete DDPM models (SD 1.x / 2.x / XL): eps- and v-prediction


def _is_max_denoise(sigma_max: float, sigma) -> bool:
    """ComfyUI Sampler.max_denoise: sigma within 1e-5 relative of sigma_max (ComfyUI's own rel_tol;
    a schedule's first sigma is sigma_max up to float32 rounding), or above it. Decides
    noise_scaling's max_denoise."""
    s = float(rxp.to_numpy(sigma)) if hasattr(sigma, "shape") else float(sigma)
    return math.isclose(sigma_max, s, rel_tol=1e-05) or s > sigma_max


class ModelSamplingDiscrete:
    """A discrete-time DDPM's noise levels, sigma <-> timestep maps and output parameterisation.

    Attributes (ComfyUI's names): ``sigmas`` (N,) ascending (sigmas[t] is timestep t's noise level),
    ``log_sigmas``, ``alphas_cumprod`` (N,), arrays in ``like``'s namespace/device, float64 where
    available; ``sigma_min``, ``sigma_max`` (Python floats), ``prediction`` ("eps" | "v"),
    ``num_timesteps``, ``sigma_data`` (1.0), ``config`` (the normalised config dict) and
    ``host_sigmas`` (the table as Python floats, for building schedules on the host).

    ComfyUI's float32 buffers: ``host_sigmas_f32`` (the float64 sigmas rounded to float32),
    ``host_log_sigmas_f32`` (their float64 log, rounded) as Python floats, and ``log_sigmas_f32``,
    the latter as a float32 array on the device (for ``timestep(rounding="round")``).
    """

    sigma_data = 1.0

    def __init__(self, sigmas: Sequence[float], *, like, prediction: str = "eps",
                 alphas_cumprod: Sequence[float] | None = None, config: dict | None = None):
        if prediction not in ("eps", "v"):
            raise RefsdError(f"prediction {prediction!r} is not supported; valid: eps, v")
        host = [float(s) for s in sigmas]
        if len(host) < 2 or any(b < a for a, b in zip(host, host[1:])) or not host[0] > 0:
            raise RefsdError("model sampling needs at least 2 positive sigmas in ascending order")
        if alphas_cumprod is None:
            alphas_cumprod = [1.0 / (s * s + 1.0) for s in host]
        xp = rxp.namespace(like)
        dt, dev = _table_dtype(like), rxp.device(like)
        self.prediction = prediction
        self.config = dict(config or {})
        self.num_timesteps = len(host)
        self.host_sigmas = tuple(host)
        self.sigmas = xp.asarray(host, dtype=dt, device=dev)
        self.log_sigmas = xp.log(self.sigmas)
        self.alphas_cumprod = xp.asarray([float(a) for a in alphas_cumprod], dtype=dt, device=dev)
        self.sigma_min = host[0]
        self.sigma_max = host[-1]
        # ComfyUI set_sigmas: register_buffer("sigmas", sigmas.float()), ("log_sigmas", sigmas.log().float())
        self.host_sigmas_f32 = tuple(f32(s) for s in host)
        self.host_log_sigmas_f32 = tuple(f32(math.log(s)) for s in host)
        self.log_sigmas_f32 = xp.asarray(self.host_log_sigmas_f32, dtype=xp.float32, device=dev)

    @classmethod
    def from_config(cls, config: dict, *, like, zsnr_terminal: str | float = "comfyui") -> "ModelSamplingDiscrete":
        """Build from a diffusers scheduler config (scheduler_config.json keys).

        Used keys: ``beta_schedule`` ("scaled_linear" | "linear"), ``beta_start``, ``beta_end``,
        ``num_train_timesteps``, ``prediction_type`` ("epsilon" | "v_prediction"),
        ``rescale_betas_zero_snr``, ``trained_betas``; missing ones take CONFIG_DEFAULTS (SD's
        values); other keys (timestep_spacing, steps_offset, ...) belong to schedules and are
        ignored. ``zsnr_terminal``: the alpha_cumprod that replaces the zero-SNR terminal 0,
        "comfyui" (default), "diffusers" (2**-24, its Euler-family schedulers) or a number.
        """
        if str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("prediction_type") == "flow":
            raise RefsdError("this is a flow-matching config; use ModelSamplingDiscreteFlow.from_config "
                             "(or refsd.sampling.model_sampling.from_config, which picks the class)")
        cfg = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_DEFAULTS}}
        pred = PREDICTIONS.get(cfg["prediction_type"])
        if pred is None:
            raise RefsdError(f"prediction_type {cfg['prediction_type']!r} is not supported; "
                             f"valid: {', '.join(PREDICTIONS)}")
        abar = _cumprod([1.0 - b for b in _betas(cfg)])
        if cfg["rescale_betas_zero_snr"]:
            if isinstance(zsnr_terminal, str):
                if zsnr_terminal not in ZSNR_TERMINAL_ALPHAS_CUMPROD:
                    raise RefsdError(f"zsnr_terminal {zsnr_terminal!r} unknown; valid: "
                                     f"{', '.join(ZSNR_TERMINAL_ALPHAS_CUMPROD)} or a number in (0, 1)")
                zsnr_terminal = ZSNR_TERMINAL_ALPHAS_CUMPROD[zsnr_terminal]
            abar = rescale_zero_terminal_snr(abar, zsnr_terminal)
        sigmas = [math.sqrt((1.0 - a) / a) for a in abar]
        return cls(sigmas, like=like, prediction=pred, alphas_cumprod=abar, config=cfg)

    # -- timesteps ---------------------------------------------------------------------------

    def _table(self, v):
        """v (array or Python number) as an array in the table's dtype and device."""
        xp = rxp.namespace(self.sigmas)
        if not hasattr(v, "shape"):
            return xp.asarray(float(v), dtype=self.sigmas.dtype, device=rxp.device(self.sigmas))
        return v if v.dtype == self.sigmas.dtype else xp.astype(v, self.sigmas.dtype)

    def timestep(self, sigma, *, rounding: str = "none"):
        """The timestep of noise level ``sigma`` (any shape), by interpolation in log sigma.

        ``rounding="none"``: continuous t, piecewise linear in log sigma between table entries and
        clamped to [0, N-1] (k-diffusion DiscreteSchedule.sigma_to_t with quantize=False), in the
        table's dtype. ``rounding="round"``: ComfyUI ModelSamplingDiscrete.timestep, the index of the
        nearest table entry in log sigma, argmin |log sigma - log_sigmas| with the first index on ties,
        computed as ComfyUI does in float32: sigma rounded to float32, its log correctly rounded to
        float32, differences to the float32 table ``log_sigmas_f32`` in float32. Where sigma lies
        halfway between two entries (a schedule's t = k + 0.5) the float32 rounding decides, as in
        ComfyUI. Returned in sigma's dtype (the table's for Python numbers).
        """
        if rounding not in ("none", "round"):
            raise RefsdError(f"timestep rounding {rounding!r} unknown; valid: none, round")
        xp = rxp.namespace(self.log_sigmas)
        s = self._table(sigma)
        out_dtype = sigma.dtype if hasattr(sigma, "shape") else s.dtype
        if rounding == "round":
            flat = xp.astype(xp.reshape(s, (-1,)), xp.float32)
            log_sigma = self._log_f32(flat)
            dists = xp.abs(log_sigma[None, :] - self.log_sigmas_f32[:, None])  # (N, B) float32
            t = xp.reshape(xp.argmin(dists, axis=0), tuple(s.shape))
            return xp.astype(t, out_dtype)
        flat = xp.log(xp.reshape(s, (-1,)))
        n = self.num_timesteps
        # low: the last table entry <= log sigma, kept in [0, N-2] so (low, low+1) is a bracket.
        low = xp.clip(xp.searchsorted(self.log_sigmas, flat, side="right") - 1, 0, n - 2)
        high = low + 1
        lo, hi = xp.take(self.log_sigmas, low, axis=0), xp.take(self.log_sigmas, high, axis=0)
        w = xp.clip((lo - flat) / (lo - hi), 0.0, 1.0)
        t = (1.0 - w) * xp.astype(low, s.dtype) + w * xp.astype(high, s.dtype)
        t = xp.reshape(t, tuple(s.shape))
        return t if t.dtype == out_dtype else xp.astype(t, out_dtype)

    def _log_f32(self, s32):
        """log of a float32 array, correctly rounded to float32: through float64 where the device has it."""
        xp = rxp.namespace(s32)
        if self.sigmas.dtype == xp.float64:
            return xp.astype(xp.log(xp.astype(s32, xp.float64)), xp.float32)
        return xp.log(s32)

    def sigma(self, timestep):
        """The noise level at (continuous) ``timestep``: log sigma interpolated linearly between the
        neighbouring integer timesteps, t clamped to [0, N-1] (ComfyUI ModelSamplingDiscrete.sigma),
        in the table's dtype. ``sigma_f32`` is ComfyUI's float32 arithmetic of the same."""
        xp = rxp.namespace(self.log_sigmas)
        t = self._table(timestep)
        out_dtype = timestep.dtype if hasattr(timestep, "shape") else t.dtype
        flat = xp.clip(xp.reshape(t, (-1,)), 0.0, float(self.num_timesteps - 1))
        low = xp.floor(flat)
        w = flat - low
        low_i, high_i = xp.astype(low, xp.int64), xp.astype(xp.ceil(flat), xp.int64)
        log_sigma = (1.0 - w) * xp.take(self.log_sigmas, low_i, axis=0) + w * xp.take(self.log_sigmas, high_i, axis=0)
        out = xp.reshape(xp.exp(log_sigma), tuple(t.shape))
        return out if out.dtype == out_dtype else xp.astype(out, out_dtype)

    # -- ComfyUI's float32 arithmetic on the host (parity="comfyui" schedules) ------------------

    def sigma_f32(self, timesteps: Sequence[float]) -> list[float]:
        """ComfyUI ModelSamplingDiscrete.sigma as it computes it, in float32: t = f32(timestep)
        clamped to [0, N-1], w = t - floor(t), log sigma = f32(f32(f32(1 - w) * L[floor t]) +
        f32(w * L[ceil t])) over the float32 log table L, sigma = f32(exp(log sigma)). Python floats
        in and out; each result is a float32 value."""
        table, top = self.host_log_sigmas_f32, float(self.num_timesteps - 1)
        out = []
        for t in timesteps:
            t = min(max(f32(t), 0.0), top)
            lo, hi = math.floor(t), math.ceil(t)
            w = t - lo  # exact
            out.append(f32(math.exp(f32(f32(f32(1.0 - w) * table[lo]) + f32(w * table[hi])))))
        return out

    def timestep_f32(self, sigmas: Sequence[float]) -> list[float]:
        """ComfyUI ModelSamplingDiscrete.timestep in float32, on the host (``timestep(rounding="round")``
        for Python floats): argmin_i |f32(f32(log f32(sigma)) - L[i])|, the first index on ties. A
        sigma of 0 (log -inf) gives 0, as torch's argmin over infinities."""
        table = self.host_log_sigmas_f32
        out = []
        for s in sigmas:
            s = f32(s)
            log_sigma = f32(math.log(s)) if s > 0 else -math.inf
            out.append(float(min(range(len(table)), key=lambda i: abs(f32(log_sigma - table[i])))))
        return out

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at a fraction of the way through sampling (0 = start, 1 = end), as ComfyUI's
        start/end_percent (ControlNet, conditioning ranges): <= 0 -> 999999999.9, >= 1 -> 0.0, else
        sigma(f32((1 - percent) * (N - 1))) in ComfyUI's float32 arithmetic (``sigma_f32``)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma_f32([(1.0 - percent) * (self.num_timesteps - 1)])[0]  # torch.tensor: float32

    def is_max_denoise(self, sigma) -> bool:
        """Whether sampling starting at ``sigma`` starts from pure noise (see ``_is_max_denoise``)."""
        return _is_max_denoise(self.sigma_max, sigma)

    # -- the network's input and output ------------------------------------------------------

    def calculate_input(self, sigma, x):
        """c_in * x = x / sqrt(sigma^2 + sigma_data^2): the network's input (ComfyUI EPS.calculate_input)."""
        xp = rxp.namespace(x)
        s = broadcast_sigma(sigma, x)
        return x / xp.sqrt(s * s + self.sigma_data ** 2)

    def calculate_denoised(self, sigma, model_output, x):
        """The denoised estimate from the network's output (ComfyUI EPS / V_PREDICTION.calculate_denoised)."""
        xp = rxp.namespace(x, model_output)
        s = broadcast_sigma(sigma, x)
        if self.prediction == "eps":
            return x - model_output * s
        sd2 = self.sigma_data ** 2
        return x * (sd2 / (s * s + sd2)) - model_output * (s * self.sigma_data / xp.sqrt(s * s + sd2))

    def noise_scaling(self, sigma, noise, latent_image=None, max_denoise: bool = False):
        """The sampler's starting point: latent_image + sigma * noise, or, when sampling from pure
        noise (``max_denoise``, see is_max_denoise), latent_image + sqrt(1 + sigma^2) * noise: the
        noise's std at t = T in the unscaled DDPM view (ComfyUI EPS.noise_scaling)."""
        xp = rxp.namespace(noise)
        s = broadcast_sigma(sigma, noise)
        out = noise * (xp.sqrt(1.0 + s * s) if max_denoise else s)
        return out if latent_image is None else out + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        """Undo noise_scaling's scaling of the final sample: the identity for eps/v models."""
        return latent

    def noise_factor_f32(self, sigma: float, max_denoise: bool) -> float:
        """noise_scaling's factor on the noise, in ComfyUI's float32 arithmetic on a float32 sigma:
        torch.sqrt(1.0 + sigma ** 2.0) from pure noise, else sigma (EPS.noise_scaling)."""
        return f32(math.sqrt(f32(1.0 + f32(sigma * sigma)))) if max_denoise else sigma


# --------------------------------------------------------------------------------------------
# flow matching (rectified flow: SD3, Flux-style): the extension point


def const_noise_scaling(sigma, noise, latent_image=None):
    """sigma * noise + (1 - sigma) * latent_image (sigma * noise without a latent): a rectified-flow
    latent at noise level sigma. ComfyUI CONST.noise_scaling (noise_scale 1) and diffusers
    FlowMatchEulerDiscreteScheduler.scale_noise (img2img's start) compute it in this order."""
    s = broadcast_sigma(sigma, noise)
    return noise * s if latent_image is None else noise * s + latent_image * (1.0 - s)


class ModelSamplingDiscreteFlow:
    """Rectified-flow model sampling (ComfyUI ModelSamplingDiscreteFlow + CONST).

    x_sigma = (1 - sigma) x0 + sigma * noise with sigma in (0, 1]; the network predicts the velocity
    v = noise - x0 from the unscaled x (c_in = 1), so D = x - sigma * v. The table holds
    sigmas[i] = time_snr_shift(shift, (i + 1) / N) for i < N; timestep = sigma * multiplier.
    Same attributes as ModelSamplingDiscrete, with ``prediction = "const"`` and no
    ``alphas_cumprod`` (None): samplers that need a DDPM alpha table do not apply; ComfyUI's float32
    table is ``host_sigmas_f32`` (no log table: flow timesteps are not looked up).
    """

    sigma_data = 1.0
    prediction = "const"
    alphas_cumprod = None

    def __init__(self, *, like, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        if not shift > 0:
            raise RefsdError(f"flow shift must be > 0, got {shift}")
        self.shift, self.multiplier, self.num_timesteps = float(shift), float(multiplier), int(timesteps)
        self.config = {"shift": self.shift, "multiplier": self.multiplier, "num_train_timesteps": self.num_timesteps}
        n, m = self.num_timesteps, self.multiplier
        # ComfyUI: self.sigma((arange(1, N + 1) / N) * multiplier)
        host = [self._shift_host(((i / n) * m) / m) for i in range(1, n + 1)]
        xp = rxp.namespace(like)
        self.host_sigmas = tuple(host)
        self.sigmas = xp.asarray(host, dtype=_table_dtype(like), device=rxp.device(like))
        self.log_sigmas = xp.log(self.sigmas)
        self.sigma_min, self.sigma_max = host[0], host[-1]
        # ComfyUI's float32 buffer: the same formula in float32 torch (int arange / N -> float32)
        fm = f32(m)
        self.host_sigmas_f32 = tuple(self.sigma_f32([f32(f32(i / n) * fm) for i in range(1, n + 1)]))

    @classmethod
    def from_config(cls, config: dict, *, like) -> "ModelSamplingDiscreteFlow":
        """From a diffusers FlowMatchEulerDiscreteScheduler config: ``shift`` (1.0),
        ``num_train_timesteps`` (1000), and refsd's ``multiplier`` (1000; ComfyUI's name)."""
        if config.get("use_dynamic_shifting"):
            raise RefsdError("a dynamically shifted flow config (use_dynamic_shifting) is ModelSamplingFlux's, "
                             "with mu: use model_sampling.from_config(config, like=..., mu=...)")
        return cls(like=like, shift=config.get("shift", 1.0), multiplier=config.get("multiplier", 1000.0),
                   timesteps=config.get("num_train_timesteps", 1000))

    def timestep(self, sigma, *, rounding: str = "none"):
        """t = sigma * multiplier. ComfyUI's flow timesteps are continuous, so ``rounding`` (accepted
        for interface compatibility with ModelSamplingDiscrete) has no effect."""
        if rounding not in ("none", "round"):
            raise RefsdError(f"timestep rounding {rounding!r} unknown; valid: none, round")
        if not hasattr(sigma, "shape"):
            xp = rxp.namespace(self.sigmas)
            return xp.asarray(float(sigma) * self.multiplier, dtype=self.sigmas.dtype, device=rxp.device(self.sigmas))
        return sigma * self.multiplier

    def _shift_host(self, t: float) -> float:
        """The shifted sigma of a flow time t in [0, 1], on Python floats."""
        return time_snr_shift(self.shift, t)

    def _shift_array(self, t):
        """``_shift_host`` on an array."""
        return t if self.shift == 1.0 else self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def sigma(self, timestep):
        """sigma = time_snr_shift(shift, t / multiplier)."""
        xp = rxp.namespace(self.sigmas)
        if not hasattr(timestep, "shape"):
            timestep = xp.asarray(float(timestep), dtype=self.sigmas.dtype, device=rxp.device(self.sigmas))
        return self._shift_array(timestep / self.multiplier)

    def sigma_f32(self, timesteps: Sequence[float]) -> list[float]:
        """ComfyUI's sigma in its float32 arithmetic: t = f32(timestep) / multiplier, then
        shift * t / (1 + (shift - 1) * t), each operation rounded to float32. Python floats."""
        m = f32(self.multiplier)
        ts = [f32(f32(v) / m) for v in timesteps]
        return ts if self.shift == 1.0 else [time_snr_shift_f32(self.shift, t) for t in ts]

    def timestep_f32(self, sigmas: Sequence[float]) -> list[float]:
        """ComfyUI's timestep in float32: f32(f32(sigma) * multiplier)."""
        m = f32(self.multiplier)
        return [f32(f32(s) * m) for s in sigmas]

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI: time_snr_shift(shift, 1 - percent) on Python floats; 1.0 at <= 0, 0.0 at >= 1."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self._shift_host(1.0 - percent)

    def is_max_denoise(self, sigma) -> bool:
        return _is_max_denoise(self.sigma_max, sigma)

    def calculate_input(self, sigma, x):
        """c_in = 1: a flow network sees x itself (ComfyUI CONST.calculate_input)."""
        return x

    def calculate_denoised(self, sigma, model_output, x):
        """D = x - sigma * v (ComfyUI CONST.calculate_denoised)."""
        return x - model_output * broadcast_sigma(sigma, x)

    def noise_scaling(self, sigma, noise, latent_image=None, max_denoise: bool = False):
        """(1 - sigma) * latent + sigma * noise: flow interpolation; max_denoise changes nothing
        (at sigma = 1 the latent drops out). ComfyUI CONST.noise_scaling."""
        return const_noise_scaling(sigma, noise, latent_image)

    def inverse_noise_scaling(self, sigma, latent):
        """latent / (1 - sigma) (ComfyUI CONST.inverse_noise_scaling; sigma is the last, usually 0)."""
        return latent / (1.0 - broadcast_sigma(sigma, latent))

    def noise_factor_f32(self, sigma: float, max_denoise: bool) -> float:
        """noise_scaling's factor on the noise: sigma, also from pure noise (CONST.noise_scaling; the
        latent's own factor 1 - sigma is applied by noise_scaling / const_noise_scaling)."""
        return sigma


class ModelSamplingFlux(ModelSamplingDiscreteFlow):
    """Flux's rectified-flow model sampling (ComfyUI ModelSamplingFlux + CONST).

    As ModelSamplingDiscreteFlow, with the exponential shift sigma(t) = flux_time_shift(mu, t) in place
    of time_snr_shift, a 10000-entry table (sigmas[i] = sigma((i + 1) / 10000)) and timestep = sigma
    (multiplier 1: the Flux network scales its timestep by 1000 itself). ``shift`` is ComfyUI's name
    for mu: 1.15 by default (ComfyUI's Flux default), or resolution-dependent from ``flux_shift(width,
    height)`` (ComfyUI's ModelSamplingFlux node) / ``calculate_shift(seq_len)`` (diffusers' dynamic
    shifting); mu = log(s) equals a fixed SD3-style shift s.
    """

    def __init__(self, *, like, shift: float = 1.15, timesteps: int = 10000):
        self.mu = float(shift)
        super().__init__(like=like, shift=1.0, multiplier=1.0, timesteps=timesteps)
        self.shift = self.mu
        self.config = {"mu": self.mu, "num_train_timesteps": self.num_timesteps, "flux": True}

    def _shift_host(self, t: float) -> float:
        return flux_time_shift(self.mu, t) if t > 0 else 0.0

    def _shift_array(self, t):
        xp = rxp.namespace(t)
        e = math.exp(self.mu)
        safe = xp.where(t > 0, t, xp.ones_like(t))
        return xp.where(t > 0, e / (e + (1.0 / safe - 1.0)), xp.zeros_like(t))

    def sigma_f32(self, timesteps: Sequence[float]) -> list[float]:
        """ComfyUI's flux_time_shift on a float32 tensor, as torch evaluates it: the Python float
        e = exp(mu) enters float32 arithmetic as f32(e); ``1 / t`` and ``e / d`` are torch's
        ``__rtruediv__``, a float32 reciprocal then a product: f32(f32(1 / d) * f32(e)) with
        d = f32(f32(e) + f32(f32(1 / t) - 1)); ``** 1.0`` is exact. Checked bit for bit against torch
        (tests/test_flow.py)."""
        e, out = f32(math.exp(self.mu)), []
        for ts in timesteps:
            t = f32(ts)
            if t > 0:
                d = f32(e + f32(f32(1.0 / t) - 1.0))
                out.append(f32(f32(1.0 / d) * e))
            else:
                out.append(0.0)
        return out

    @classmethod
    def from_config(cls, config: dict, *, like, mu: float | None = None) -> "ModelSamplingFlux":
        """From a diffusers FlowMatchEulerDiscreteScheduler config with ``use_dynamic_shifting`` (Flux):
        ``mu`` (required: ``calculate_shift`` of the image's sequence length, or ``flux_shift``)."""
        if mu is None:
            raise RefsdError("a dynamically shifted flow model (use_dynamic_shifting) needs mu: "
                             "calculate_shift(image_seq_len) or flux_shift(width, height)")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise RefsdError(f"time_shift_type {config['time_shift_type']!r} is not supported; valid: exponential")
        return cls(like=like, shift=mu)


# ComfyUI's model sampling per flow family (comfy/supported_models.py sampling_settings, model_base.py
# model_sampling: SD3 and Flux-schnell are ModelType.FLOW, Flux-dev ModelType.FLUX).
COMFYUI_FLOW_FAMILIES = ("sd3", "flux_dev", "flux_schnell")


def comfyui_flow_model_sampling(family: str, *, like, width: int | None = None, height: int | None = None):
    """The model sampling ComfyUI gives a flow family: "sd3" (SD3 / SD3.5) ModelSamplingDiscreteFlow
    shift 3.0, multiplier 1000; "flux_dev" ModelSamplingFlux, mu 1.15, or flux_shift(width, height) when
    the size is given (the ModelSamplingFlux node of ComfyUI's Flux workflows); "flux_schnell"
    ModelSamplingDiscreteFlow shift 1.0, multiplier 1.0 (a 1000-entry table, t = sigma)."""
    if family == "sd3":
        return ModelSamplingDiscreteFlow(like=like, shift=3.0, multiplier=1000.0)
    if family == "flux_dev":
        mu = 1.15 if width is None or height is None else flux_shift(width, height)
        return ModelSamplingFlux(like=like, shift=mu)
    if family == "flux_schnell":
        return ModelSamplingDiscreteFlow(like=like, shift=1.0, multiplier=1.0)
    raise RefsdError(f"flow family {family!r} unknown; valid: {', '.join(COMFYUI_FLOW_FAMILIES)}")


def from_config(config: dict, *, like, mu: float | None = None, **kw):
    """ModelSamplingDiscreteFlow for flow-matching configs (``_class_name`` FlowMatch*, or
    ``prediction_type: "flow"``; ModelSamplingFlux with ``mu`` when ``use_dynamic_shifting``),
    else ModelSamplingDiscrete."""
    if str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("prediction_type") == "flow":
        if config.get("use_dynamic_shifting"):
            return ModelSamplingFlux.from_config(config, like=like, mu=mu)
        return ModelSamplingDiscreteFlow.from_config(config, like=like)
    return ModelSamplingDiscrete.from_config(config, like=like, **kw)


def sigma_array(model_sampling: Any, values: Sequence[float]):
    """Host floats as an array in ``model_sampling``'s table dtype and device (for schedules)."""
    xp = rxp.namespace(model_sampling.sigmas)
    return xp.asarray([float(v) for v in values], dtype=model_sampling.sigmas.dtype,
                      device=rxp.device(model_sampling.sigmas))
