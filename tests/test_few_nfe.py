"""Few-NFE sampling: time grids on every path, DPM-Solver++ and EDM's sampler, checked against closed forms, their
measured orders, diffusers' DPMSolverMultistepScheduler and a transcription of NVlabs/edm's edm_sampler."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from conftest import ALL_SCHEDULES
from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.objectives import Objective
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.paths.schedules import LinearVPSchedule
from flowdiff.samplers import DPMSolverPlusPlusSampler, EDMSampler, EulerSampler, HeunSampler
from flowdiff.samplers.grids import GRIDS, SIGMA_MAX, SIGMA_MIN, sigma_of, time_of_sigma

MU, S = 1.5, 0.5  # data N(MU, S^2): the denoiser and the ODE's flow are known in closed form


def gaussian_data_fn(schedule):
    """``E[z | x_t]`` for z ~ N(MU, S^2 I) on the path of ``schedule``."""

    def data_fn(x, t):
        v = schedule(t.to(torch.float64))
        a, b = (w.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1)) for w in (v.alpha, v.beta))
        return MU + S**2 * a / (a**2 * S**2 + b**2) * (x - a * MU)

    return data_fn


def exact_flow(schedule, x, t0: float, t1: float):
    """The probability-flow ODE's map from t0 to t1 for Gaussian data: in EDM's x / alpha it is affine in sigma."""
    s0, s1 = (float(sigma_of(schedule, torch.tensor([t]))) for t in (t0, t1))
    a0, a1 = (float(schedule(torch.tensor([t], dtype=torch.float64)).alpha) for t in (t0, t1))
    return a1 * (MU + math.sqrt(S**2 + s1**2) / math.sqrt(S**2 + s0**2) * (x / a0 - MU))


# ------------------------------------------------------------------ grids
@pytest.mark.parametrize("name", ALL_SCHEDULES)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_grids_increase_inside_the_span_on_every_path(name, grid):
    schedule = ALL_SCHEDULES[name]
    for lo, hi in ((0.0, 1.0), (0.3, 0.98)):
        for steps in (1, 2, 10):
            t = GRIDS[grid](steps, lo, hi, schedule)
            assert len(t) == steps + 1 and bool((t[1:] > t[:-1]).all()), (grid, lo, hi, t)
            assert float(t[0]) >= lo - 1e-12 and float(t[-1]) == pytest.approx(hi, abs=1e-12)


@pytest.mark.parametrize("name", ["condot", "cosine", "linear_vp"])
def test_edm_grid_is_karras_sigmas_and_logsnr_is_even_in_lambda(name):
    schedule = ALL_SCHEDULES[name]
    n, rho = 10, 7.0
    t = GRIDS["edm"](n, 0.0, 1.0, schedule, rho=rho)
    i = torch.arange(n, dtype=torch.float64)
    karras = (SIGMA_MAX ** (1 / rho) + i / (n - 1) * (SIGMA_MIN ** (1 / rho) - SIGMA_MAX ** (1 / rho))) ** rho
    start = max(float(time_of_sigma(schedule, torch.tensor([SIGMA_MAX]))), 0.0)
    assert float(t[0]) == pytest.approx(start, abs=1e-12) and float(t[-1]) == 1.0  # EDM's grid ends at sigma = 0
    torch.testing.assert_close(sigma_of(schedule, t[:-1]), karras, rtol=1e-9, atol=0)
    t = GRIDS["logsnr"](n, 0.2, 0.9, schedule)
    lam = -torch.log(sigma_of(schedule, t))
    torch.testing.assert_close(lam[1:] - lam[:-1], (lam[-1] - lam[0]).expand(n) / n, rtol=1e-9, atol=1e-12)


def test_shift_grid_is_sd3s_time_shift_on_condot():
    t = GRIDS["shift"](8, 0.0, 1.0, CondOTSchedule(), shift=3.0)
    tau = 1 - torch.linspace(0, 1, 9, dtype=torch.float64)  # SD3's time: 1 is the noise
    expected = 1 - 3 * tau / (1 + 2 * tau)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-12)


def test_grid_option_is_refused_without_a_gaussian_path():
    with pytest.raises(ValueError, match="grid=edm is defined through a Gaussian path"):
        EulerSampler(steps=4, grid="edm").sample(lambda x, t: x, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="grid='spiral'"):
        EulerSampler(steps=4, grid="spiral")


def test_euler_on_a_non_uniform_grid_steps_exactly_there():
    path = GaussianPath(CondOTSchedule())
    sampler = EulerSampler(steps=6, grid="edm")
    out = sampler.sample(lambda x, t: torch.zeros_like(x), torch.zeros(3, 2), path=path, return_trajectory=True)
    torch.testing.assert_close(out.times.double(), GRIDS["edm"](6, 0.0, 1.0, path.schedule), rtol=0, atol=1e-7)
    assert out.nfe == 6


# ------------------------------------------------------------------ DPM-Solver++
def _dpm_error(schedule, order: int, steps: int) -> float:
    x0 = torch.linspace(-3, 3, 64, dtype=torch.float64)[:, None]
    t0, t1 = 0.2, 0.9
    sampler = DPMSolverPlusPlusSampler(order=order, steps=steps, grid="logsnr", lower_order_final=False)
    times = sampler.times(x0, (t0, t1), GaussianPath(schedule)).double()
    out = sampler.integrate(None, x0, times, data_fn=gaussian_data_fn(schedule), path=GaussianPath(schedule))
    return float((out.x - exact_flow(schedule, x0, t0, t1)).abs().max())


@pytest.mark.parametrize("name", ["condot", "cosine", "linear_vp"])
def test_dpm_solver_measured_order(name):
    """2M's error ~ h^2 on the Gaussian flow (measured from 32 to 128 steps, on a grid even in log-SNR); 3M is more
    accurate still, though its first-order start keeps its global order at 2 (as the paper's and diffusers'
    solvers do)."""
    two = [_dpm_error(ALL_SCHEDULES[name], 2, n) for n in (32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(two, two[1:])]
    assert all(1.7 < r < 2.5 for r in rates), (two, rates)
    three = _dpm_error(ALL_SCHEDULES[name], 3, 64)
    assert three < 0.5 * two[1], (three, two)


def test_dpm_solver_first_order_is_ddim_and_one_evaluation_per_step():
    from flowdiff.samplers import DDIMSampler

    path = GaussianPath(ALL_SCHEDULES["cosine"])
    model = FlowModel(MLP(dim=2, width=16, depth=2), path, Objective("noise", sample_margins=(0.3, 0.02)), (2,))
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    one = model.sample(32, DPMSolverPlusPlusSampler(order=1, steps=7, grid="uniform"), x0=x0)
    ddim = model.sample(32, DDIMSampler(path, steps=7), x0=x0)
    torch.testing.assert_close(one.x, ddim.x, rtol=1e-4, atol=1e-5)
    assert one.nfe == ddim.nfe == 7  # one evaluation per step (the data prediction is finite at t = 1 here)


# ------------------------------------------------------------------ diffusers on the same network
needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="the diffusers cross-check needs `pip install -e .[dev]`"
)


def _diffusers_loop(scheduler, net_call, x, steps):
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    for i, k in enumerate(scheduler.timesteps):
        x = scheduler.step(net_call(x, float(sigmas[i])), k, x).prev_sample
    return x, sigmas


@needs_diffusers
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_matches_diffusers_on_a_noise_model(steps):
    """diffusers' DPMSolverMultistepScheduler(dpmsolver++, order 2) driving a flowdiff noise-prediction network on
    linear_vp: diffusers' 1,000 training steps are the path's times t_k = 1 - (k + 1) / 1000 (its alphas_cumprod
    alpha_t^2), its noise levels sqrt((1 - abar) / abar) are beta_t / alpha_t, and the times are converted at the
    boundary by the path's inverse: the same start gives the same samples."""
    from diffusers import DPMSolverMultistepScheduler

    torch.manual_seed(0)
    path = GaussianPath(LinearVPSchedule())
    model = FlowModel(MLP(dim=2, width=32, depth=2).double(), path, Objective("noise"), (2,)).eval()
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon")
    train_times = 1 - (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    scheduler.alphas_cumprod = path.schedule(train_times).alpha ** 2

    def eps(x, sigma):  # diffusers asks at its noise level; the network is asked at the course's time
        t = time_of_sigma(path.schedule, torch.tensor([sigma])).expand(len(x))
        return model.prediction(x.double(), t)

    ours_x0 = x0.clone()
    theirs, sigmas = _diffusers_loop(scheduler, eps, x0, steps)
    times = torch.cat([time_of_sigma(path.schedule, sigmas[:-1]), torch.ones(1, dtype=torch.float64)])
    fields = model.vector_fields()
    ours = DPMSolverPlusPlusSampler(order=2, steps=steps).integrate(
        None, ours_x0, times, data_fn=fields.data, path=path
    )
    assert ours.nfe == steps
    err = float((ours.x - theirs.double()).abs().max() / ours.x.abs().max())
    assert err < 1e-5, err  # relative to the samples' scale: diffusers steps in float32, flowdiff here in float64


@needs_diffusers
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_matches_diffusers_on_a_velocity_model(steps):
    """The same scheduler with flow sigmas and flow_prediction (x_t = (1 - sigma) x0 + sigma eps, the output
    eps - x0 = -u_t) driving a flowdiff velocity network on CondOT (t = 1 - sigma)."""
    from diffusers import DPMSolverMultistepScheduler

    torch.manual_seed(0)
    path = GaussianPath(CondOTSchedule())
    model = FlowModel(MLP(dim=2, width=32, depth=2).double(), path, Objective("velocity"), (2,)).eval()
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True
    )

    def flow(x, sigma):
        return -model.prediction(x.double(), torch.full((len(x),), 1 - sigma, dtype=torch.float64))

    theirs, sigmas = _diffusers_loop(scheduler, flow, x0, steps)
    times = 1 - sigmas.float().double()
    fields = model.vector_fields()
    ours = DPMSolverPlusPlusSampler(order=2, steps=steps).integrate(None, x0, times, data_fn=fields.data, path=path)
    err = float((ours.x - theirs.double()).abs().max() / ours.x.abs().max())
    assert err < 1e-5, err


# ------------------------------------------------------------------ EDM
def edm_sampler_transcribed(denoise, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0,
                            S_min=0.0, S_max=float("inf"), S_noise=1.0, randn_like=torch.randn_like):  # fmt: skip
    """NVlabs/edm ``generate.py::edm_sampler`` (Algorithm 2), as published, without its class labels and
    ``net.round_sigma`` (an identity for the networks there)."""
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho  # fmt: skip  # noqa: E501
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        denoised = denoise(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = denoise(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("churn", [0.0, 30.0])
@pytest.mark.parametrize("name", ["condot", "linear_vp"])
def test_edm_sampler_equals_nvlabs_edm_sampler(churn, name):
    """The same latents and noise: flowdiff's EDMSampler on the course's path equals EDM's own loop in sigma."""
    schedule = ALL_SCHEDULES[name]
    data_fn = gaussian_data_fn(schedule)

    def denoise(x, sigma):  # EDM's D(x; sigma) = E[z | x_t = alpha_t x] at sigma = beta_t / alpha_t
        t = time_of_sigma(schedule, torch.as_tensor(sigma, dtype=torch.float64).reshape(1))
        return data_fn(float(schedule(t).alpha) * x, t.expand(len(x)))

    latents = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    kw = {"S_churn": churn, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    theirs = edm_sampler_transcribed(denoise, latents, 12, **kw, randn_like=lambda x: torch.randn(x.shape, generator=g,
                                     dtype=x.dtype))  # fmt: skip
    sampler = EDMSampler(s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003, steps=12, grid="edm")
    path = GaussianPath(schedule)
    times = sampler.times(latents, (0.0, 1.0), path)
    x_start = float(schedule(times[:1].double()).alpha) * SIGMA_MAX * latents  # EDM's sigma_max * latents, scaled
    ours = sampler.sample(None, x_start, data_fn=data_fn, path=path, generator=torch.Generator().manual_seed(1))
    assert ours.nfe == 2 * 12 - 1
    torch.testing.assert_close(ours.x, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["polynomial", "linear_vp", "sqrt"])
@pytest.mark.parametrize("grid", ["uniform", "shift", "logsnr"])
def test_edm_sampler_on_any_grid_stays_inside_the_sampling_range(name, grid):
    """Its grid starts at t(sigma_max) at the earliest and churn never leaves the span: every evaluation is at a
    time inside [t_lo, 1] (here a noise objective's t_lo = 0.3 on some paths, 0 on others)."""
    schedule = ALL_SCHEDULES[name]
    path, seen = GaussianPath(schedule), []
    data_fn = gaussian_data_fn(schedule)

    def recording(x, t):
        seen.append(float(t[0]))
        return data_fn(x, t)

    for lo in (0.0, 0.3):
        for steps in (3, 12):
            seen.clear()
            sampler = EDMSampler(steps=steps, s_churn=40, grid=grid)
            x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            out = sampler.sample(None, x0, data_fn=recording, t_span=(lo, 1.0), path=path)
            assert torch.isfinite(out.x).all() and min(seen) >= lo - 1e-12, (grid, lo, steps, min(seen))


def test_edm_sampler_lands_on_the_closed_form_law():
    schedule = ALL_SCHEDULES["cosine"]
    path = GaussianPath(schedule)
    model_x0 = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sampler in (EDMSampler(steps=60), EDMSampler(steps=60, s_churn=20), DPMSolverPlusPlusSampler(steps=30)):
        t0 = float(sampler.times(model_x0, (0.0, 1.0), path)[0])
        start = path.source_at(model_x0, t0, torch.tensor([MU]), torch.tensor([S**2]))
        out = sampler.sample(None, start, data_fn=gaussian_data_fn(schedule), path=path,
                             generator=torch.Generator().manual_seed(2))  # fmt: skip
        assert float(out.x.mean()) == pytest.approx(MU, abs=0.02), sampler
        assert float(out.x.std()) == pytest.approx(S, abs=0.02), sampler


# ------------------------------------------------------------------ composition
@pytest.mark.parametrize("objective", ["velocity", "noise", "score", "data"])
def test_new_samplers_compose_with_objectives_and_guidance(objective):
    """Every objective's sampling range and CFG's guided prediction reach the new samplers (finite, NFE counted)."""
    from flowdiff.guidance import ClassifierFreeGuidance

    path = GaussianPath(ALL_SCHEDULES["cosine"])
    net = MLP(dim=2, width=16, depth=2, num_classes=3)
    model = FlowModel(net, path, Objective(objective), (2,), guidance=ClassifierFreeGuidance(null_label=3, scale=2.0))
    for sampler in (
        DPMSolverPlusPlusSampler(steps=6),
        EDMSampler(steps=5, s_churn=5),
        HeunSampler(steps=3, grid="shift"),
    ):
        out = model.sample(
            8, sampler, y=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), generator=torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(out.x).all() and out.nfe >= sampler.steps, (objective, sampler)


@pytest.mark.parametrize(
    "overrides, nfe",
    [
        (["sampler=dpmpp", "sampler.steps=6"], 6),
        (["sampler=edm", "sampler.steps=4", "sampler.s_churn=5", "guidance.scale=2"], 7),
        (["sampler=heun", "sampler.steps=3", "sampler.grid=logsnr"], 6),
    ],
)
def test_sample_py_takes_the_new_samplers_and_grids(tmp_path, overrides, nfe):
    """sample.py on a checkpoint trained with Euler (a CFG flow of the compatibility set): any sampler, grid and
    guidance scale, the NFE counted."""
    from flowdiff.evaluation import sample
    from helpers import ROOT, compose_cfg

    ckpt = ROOT / "tests" / "data" / "checkpoints" / "flow.ckpt"
    cfg = compose_cfg([f"ckpt={ckpt}", "n=64", "straightness.n=0", *overrides], tmp_path, config="sample")
    metrics = sample(cfg)
    assert metrics["nfe"] == nfe and 0 < metrics["w2"] < 10 and metrics["sampler"] == overrides[0].split("=")[1]
