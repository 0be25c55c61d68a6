"""diffusers schedulers that are no k-diffusion sampler: PNDMScheduler (PLMS, ``skip_prk_steps``).

PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. 9 and the
PLMS method) is diffusers' default scheduler for SD 1.x. It is a linear multistep method on the
noise prediction, in the DDPM-sample convention x_t (= x / sqrt(sigma^2 + 1)), stepping from t to
t - num_train_timesteps // steps with the transfer ``_get_prev_sample``:

    x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))

(a = alphas_cumprod; a_prev = final_alpha_cumprod below t = 0). With ``skip_prk_steps`` the
Runge-Kutta warm-up is replaced by one improved-Euler step: call 0 at t steps to t' with e0, call 1
at t' (the repeated timestep) redoes that step from the saved x_t with (e0 + e1) / 2; from then on
Adams-Bashforth of order 2, 3, 4 over the noise predictions kept (e1 is not kept). v-prediction is
turned into eps after the combination, with the sample the step starts from.

The coefficients are computed on the host in float32 (``refsd.pipelines.profiles.diffusers_tables.pndm_transfer``), as
diffusers computes them from its float32 ``alphas_cumprod`` tensor (0-dim torch arithmetic); the
array expressions keep diffusers' order of operations.

ref: diffusers 0.42.1 schedulers/scheduling_pndm.py (set_timesteps, step_plms, _get_prev_sample).
"""

from __future__ import annotations

from refsd.errors import RefsdError


def sample_pndm(net, x, timesteps, *, transfer, step_ratio: int, prediction: str = "epsilon", callback=None):
    """PLMS over ``net(x_t, t) -> eps or v`` (the guided UNet) from the DDPM sample ``x`` at the plan's
    ``timesteps`` (diffusers' plms_timesteps) -> the final DDPM sample. ``transfer(t, t_prev)`` gives
    the host float coefficients of ``_get_prev_sample`` (``refsd.pipelines.profiles.diffusers_tables.pndm_transfer``);
    ``callback(i, x)`` after each call, as diffusers' loop."""
    if prediction not in ("epsilon", "v_prediction"):
        raise RefsdError(f"PNDM: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    ets: list = []
    cur = None
    for counter, t in enumerate(int(t) for t in timesteps):
        out = net(x, float(t))
        t_prev = t - step_ratio
        if counter != 1:
            ets = [*ets[-3:], out]
        else:  # the repeated timestep: redo the first step from the saved sample with the mean slope
            t, t_prev = t + step_ratio, t
        sample = x
        if len(ets) == 1 and counter == 0:
            e = out
            cur = x
        elif len(ets) == 1 and counter == 1:
            e = (out + ets[-1]) / 2
            sample = cur
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        c_sample, c_diff, denom, sqrt_a, sqrt_b = transfer(t, t_prev)
        if prediction == "v_prediction":  # after the combination, with the sample the step starts from
            e = sqrt_a * e + sqrt_b * sample
        x = c_sample * sample - c_diff * e / denom  # _get_prev_sample, diffusers' order of operations
        if callback is not None:
            callback(counter, x)
    return x
