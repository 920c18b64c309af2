"""Samplers against closed forms: the Gaussian-data oracle, measured convergence orders, DDIM = Euler."""

import math

import numpy as np
import pytest
import torch

from flowdiff.objectives import Objective
from flowdiff.paths import CondOTSchedule, CosineSchedule, GaussianPath
from helpers import OBJECTIVE_FILES, objective_from_conf, objective_of, sampler_from_conf


class GaussianOracle:
    """Data N(mu, s^2 I) under a Gaussian path: every marginal quantity in closed form.

    x_t ~ N(alpha mu, var I), var = alpha^2 s^2 + beta^2, r = x - alpha mu:
      E[z | x] = mu + alpha s^2 r / var,  E[eps | x] = beta r / var,  score = -r / var,
      u = d_alpha mu + (alpha d_alpha s^2 + beta d_beta) r / var;
    and the flow maps x_a to  alpha_b mu + sqrt(var_b / var_a) (x_a - alpha_a mu).
    """

    def __init__(self, schedule, mu, s):
        self.schedule, self.mu, self.s = schedule, mu, s

    def _terms(self, x, t):
        v = self.schedule(t)
        a, b, da, db = (q[:, None] for q in (v.alpha, v.beta, v.d_alpha, v.d_beta))
        var = a**2 * self.s**2 + b**2
        return a, b, da, db, var, x - a * self.mu

    def prediction(self, kind, x, t):
        a, b, da, db, var, r = self._terms(x, t)
        return {
            "data": self.mu + a * self.s**2 * r / var,
            "noise": b * r / var,
            "score": -r / var,
            "velocity": da * self.mu + (a * da * self.s**2 + b * db) * r / var,
        }[kind]

    def flow(self, x, t_a, t_b):
        n = x.shape[0]
        ta, tb = torch.full((n,), t_a, dtype=x.dtype), torch.full((n,), t_b, dtype=x.dtype)
        a, _, _, _, var_a, r = self._terms(x, ta)
        ab, _, _, _, var_b, _ = self._terms(x, tb)
        return ab * self.mu + torch.sqrt(var_b / var_a) * r


def _fields(oracle, path, objective):
    obj = objective_of(objective)

    def velocity(x, t):
        return obj.to_velocity(path, oracle.prediction(obj.prediction, x, t), x, t)

    def score(x, t):
        return obj.to_score(path, oracle.prediction(obj.prediction, x, t), x, t)

    return obj, velocity, score


SAMPLER_SETTINGS = {
    "euler": dict(steps=400),
    "midpoint": dict(steps=50),
    "heun": dict(steps=50),
    "rk4": dict(steps=20),
    "dopri5": dict(rtol=1e-6, atol=1e-6),
    "ddim": dict(steps=200),
    "ddim_eta1": dict(steps=400, eta=1.0),
    "em_constant": dict(steps=1000, sigma=1.0, sigma_schedule="constant"),
    "em_beta": dict(steps=1000, sigma=1.5, sigma_schedule="beta"),
    "em_langevin": dict(steps=300, sigma=1.0, sigma_schedule="beta", langevin_steps=1, langevin_step=0.05),
}
DETERMINISTIC = {"euler", "midpoint", "heun", "rk4", "dopri5", "ddim"}


def _make(name, path):
    base = {
        "ddim_eta1": "ddim",
        "em_constant": "euler_maruyama",
        "em_beta": "euler_maruyama",
        "em_langevin": "euler_maruyama",
    }.get(name, name)
    return sampler_from_conf(base, path=path, **SAMPLER_SETTINGS[name])


def _oracle_cases():
    """Every sampler x objective in d = 2 (CondOT) and d = 16 (cosine). The d = 16 runs are marked slow (the SDE
    samplers' 1,000-step ones take about 20 s each on 2 cores): in the fast suite, the float32 test below covers
    the cosine schedule, with every sampler and objective, sample by sample."""
    for sampler in SAMPLER_SETTINGS:
        for objective in OBJECTIVE_FILES:
            for dim in (2, 16):
                slow = dim == 16
                yield pytest.param(sampler, objective, dim, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("sampler,objective,dim", list(_oracle_cases()))
def test_oracle_lands_on_gaussian(sampler, objective, dim):
    torch.manual_seed(dim)
    n, s = 4096, 0.5
    mu = torch.linspace(-2.0, 3.0, dim, dtype=torch.float64)
    schedule = CosineSchedule() if dim == 16 else CondOTSchedule()
    path = GaussianPath(schedule)
    oracle = GaussianOracle(schedule, mu, s)
    smp = _make(sampler, path)
    obj, velocity, score = _fields(oracle, path, objective)
    span = obj.sample_time_range(path, stochastic=smp.stochastic)
    x0 = torch.randn(n, dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    out = smp.sample(velocity, x0, score_fn=score, t_span=span, generator=g)
    t0, t1 = out.times[0].item(), out.times[-1].item()
    assert out.nfe > 0 and torch.isfinite(out.x).all()
    if sampler in DETERMINISTIC:
        # sample by sample against the exact flow map of the oracle
        err = (out.x - oracle.flow(x0, t0, t1)).abs().max().item()
        tol = 2e-2 if sampler in ("euler", "ddim") else 2e-3  # first- vs higher-order methods
        if objective == "data" and sampler in ("heun", "rk4"):
            # data -> velocity is (z_hat - x) / beta: stiff at t_max = 1 - 1e-3, where these two evaluate;
            # documented in flowdiff.objectives (ddim integrates that linear part exactly)
            tol = 0.2
        assert err < tol, f"{sampler}/{objective}: max error {err:.2e}"
    # in distribution: mean within 5 standard errors (+ the t_max gap), std within 4%
    end = schedule(torch.tensor([t1], dtype=torch.float64))
    target_mean = end.alpha.item() * mu
    target_std = math.sqrt(end.alpha.item() ** 2 * s**2 + end.beta.item() ** 2)
    mean_err = (out.x.mean(0) - target_mean).abs().max().item()
    assert mean_err < 5 * target_std / math.sqrt(n) + 0.01, f"{sampler}/{objective}: mean off by {mean_err:.3f}"
    std = out.x.std(0)
    assert (std / target_std - 1).abs().max().item() < 0.04 + 4 / math.sqrt(2 * n), (
        f"{sampler}/{objective}: std {std.min():.3f}..{std.max():.3f} vs {target_std:.3f}"
    )


def _order(sampler_name, steps_list):
    schedule = CosineSchedule()
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    path = GaussianPath(schedule)
    oracle = GaussianOracle(schedule, mu, 0.5)
    x0 = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = oracle.flow(x0, 0.0, 1.0)
    errs = []
    for steps in steps_list:
        out = sampler_from_conf(sampler_name, path=path, steps=steps).sample(
            lambda x, t: oracle.prediction("velocity", x, t), x0
        )
        errs.append((out.x - exact).abs().max().item())
    slope = np.polyfit(np.log(1 / np.array(steps_list)), np.log(errs), 1)[0]
    return slope, errs


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_measured_convergence_order(sampler, order):
    slope, errs = _order(sampler, [8, 16, 32, 64])
    assert abs(slope - order) < 0.25, f"{sampler}: measured order {slope:.2f}, errors {errs}"


def test_nfe_counts():
    path = GaussianPath(CondOTSchedule())
    x0 = torch.randn(8, 2)

    def f(x, t):
        return -x

    for name, per_step in [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4), ("ddim", 1)]:
        assert sampler_from_conf(name, path=path, steps=10).sample(f, x0).nfe == 10 * per_step
    em = sampler_from_conf("euler_maruyama", path=path, steps=10, langevin_steps=2)
    assert em.sample(f, x0, score_fn=f).nfe == 10 * 3
    # dopri5 (FSAL): 2 evaluations to choose the first step, then 6 per attempted step; tighter tolerances cost more
    nfes = []
    for tol in (1e-3, 1e-5, 1e-7):
        calls = []

        def g(x, t, calls=calls):
            calls.append(1)
            return -x * torch.cos(3 * t)[:, None]

        nfe = sampler_from_conf("dopri5", rtol=tol, atol=tol).sample(g, x0).nfe
        assert nfe == len(calls) and (nfe - 2) % 6 == 0, (tol, nfe, len(calls))
        nfes.append(nfe)
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_ddim_eta0_equals_euler_on_condot():
    path = GaussianPath(CondOTSchedule())
    oracle = GaussianOracle(path.schedule, torch.tensor([0.5, 2.0], dtype=torch.float64), 0.3)
    x0 = torch.randn(256, 2, dtype=torch.float64)
    field = lambda x, t: oracle.prediction("velocity", x, t) + torch.sin(3 * x) * t[:, None]  # noqa: E731
    euler = sampler_from_conf("euler", steps=25).sample(field, x0, return_trajectory=True)
    ddim = sampler_from_conf("ddim", path=path, steps=25).sample(field, x0, return_trajectory=True)
    assert euler.trajectory.shape == (26, 256, 2)
    torch.testing.assert_close(ddim.trajectory, euler.trajectory, rtol=1e-10, atol=1e-10)


def test_trajectory_and_errors():
    path = GaussianPath(CondOTSchedule())
    x0 = torch.randn(4, 3)
    out = sampler_from_conf("heun", steps=5).sample(lambda x, t: x, x0, return_trajectory=True)
    assert out.trajectory.shape == (6, 4, 3) and torch.equal(out.trajectory[0], x0)
    torch.testing.assert_close(out.times, torch.linspace(0, 1, 6))
    with pytest.raises(ValueError, match="steps"):
        sampler_from_conf("euler", steps=0)
    from hydra.errors import MissingConfigException

    from helpers import compose_cfg

    with pytest.raises(MissingConfigException, match=r"Could not find 'sampler/leapfrog'(.|\n)*euler_maruyama"):
        compose_cfg(["sampler=leapfrog"], "unused")  # an unknown sampler: Hydra names the ones there are
    with pytest.raises(ValueError, match="score_fn"):
        sampler_from_conf("euler_maruyama", path=path).sample(lambda x, t: x, x0)


@pytest.mark.parametrize("schedule_name", ["linear_vp", "sqrt", "polynomial"])
@pytest.mark.parametrize("objective", list(OBJECTIVE_FILES))
@pytest.mark.parametrize("sampler", ["dopri5", "heun", "ddim"])
def test_oracle_on_every_schedule(schedule_name, objective, sampler):
    """The flow map of the Gaussian oracle on the schedules the test above does not cover."""
    from conftest import ALL_SCHEDULES

    schedule = ALL_SCHEDULES[schedule_name]
    path = GaussianPath(schedule)
    oracle = GaussianOracle(schedule, torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5)
    obj, velocity, _ = _fields(oracle, path, objective)
    x0 = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sampler_from_conf(sampler, path=path, steps=200).sample(velocity, x0, t_span=obj.sample_time_range(path))
    err = (out.x - oracle.flow(x0, out.times[0].item(), out.times[-1].item())).abs().max().item()
    assert err < (3e-2 if sampler == "ddim" else 1e-3), f"{schedule_name}/{objective}/{sampler}: {err:.2e}"


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_refuses_eta_outside_zero_one(eta):
    """Beyond eta = 1 the noise term's variance beta'^2 - s^2 is negative (it used to be clamped silently)."""
    with pytest.raises(ValueError, match="0 <= eta <= 1"):
        sampler_from_conf("ddim", path=GaussianPath(CondOTSchedule()), eta=eta)


class OracleNet(torch.nn.Module):
    """A 'network' that returns the oracle's exact prediction plus a smooth error of size ``err``."""

    def __init__(self, oracle: GaussianOracle, kind: str, err: float = 1e-3) -> None:
        super().__init__()
        self.oracle, self.kind, self.err = oracle, kind, err

    def forward(self, x, t, y=None):
        exact = self.oracle.prediction(self.kind, x.double(), t.double()).to(x.dtype)
        return exact + self.err * torch.sin(3 * x + t[:, None])


def shipped_objective(name: str) -> Objective:
    """The objective with the margins of ``conf/objective/<name>.yaml``, what users run."""
    return objective_from_conf(name)


FLOAT32_SAMPLERS = {  # name -> (sampler, settings)
    "euler": ("euler", {}),
    "midpoint": ("midpoint", {}),
    "heun": ("heun", {}),
    "rk4": ("rk4", {"steps": 50}),
    "dopri5": ("dopri5", {}),
    "ddim": ("ddim", {}),
    "ddpm": ("ddim", {"eta": 1.0}),
    "euler_maruyama": ("euler_maruyama", {"steps": 300}),
}


@pytest.mark.parametrize("objective", list(OBJECTIVE_FILES))
@pytest.mark.parametrize("schedule_name", ["condot", "cosine", "linear_vp", "polynomial", "sqrt"])
def test_float32_sampling_lands_on_the_exact_answer(schedule_name, objective):
    """Every schedule x objective x sampler in float32, through FlowModule.sample with the shipped margins, fed the
    exact Gaussian prediction plus an error of 1e-3, lands on the exact answer: the oracle's flow map from the first
    time to the last, then its exact E[z | x] where the sampler ends with the data prediction.

    Before the schedules were exact at their ends in float32, cosine's beta(1) = -4.4e-8 made t = 1 look safe and
    Heun/RK4 on objective=data landed at |x| ~ 300."""
    from conftest import ALL_SCHEDULES
    from flowdiff.model import FlowModel

    schedule = ALL_SCHEDULES[schedule_name]
    path = GaussianPath(schedule)
    mu, s, n = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 1000
    oracle = GaussianOracle(schedule, mu, s)
    obj = shipped_objective(objective)
    moments = (mu.float(), torch.full((2,), s**2))  # the data's mean and variance, for a start at t0 > 0
    module = FlowModel(OracleNet(oracle, obj.prediction), path, obj, (2,), data_moments=lambda: moments)
    eps = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, (base, settings) in FLOAT32_SAMPLERS.items():
        smp = sampler_from_conf(base, path=path, **settings)
        out = module.sample(
            n, sampler=smp, x0=eps.float(), generator=torch.Generator().manual_seed(1), return_trajectory=True
        )
        assert out.x.dtype == torch.float32 and out.times[-1].item() == 1.0, name
        # a start t0 > 0 moves the source N(0, I) to the Gaussian with the marginal's moments: here, the marginal
        t0, x0 = out.times[0].item(), out.trajectory[0]
        if t0 > 0:
            a0, _, _, _, var0, _ = oracle._terms(eps, torch.full((n,), t0, dtype=torch.float64))
            torch.testing.assert_close(x0.double(), a0 * mu + var0.sqrt() * eps, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(x0, eps.float())
        t_end = torch.full((n,), out.t_end, dtype=torch.float64)
        a, _, _, _, var, _ = oracle._terms(eps, t_end)
        exact = oracle.flow(x0.double(), t0, out.t_end)
        law_sd = s
        if out.denoised:
            exact = oracle.prediction("data", exact, t_end)
            law_sd = s * (a[0] * s / var[0].sqrt()).item()  # E[z | x] is a little narrower than the data
        x = out.x.double()
        where = f"{schedule_name}/{objective}/{name}"
        if not smp.stochastic and getattr(smp, "eta", 0.0) == 0.0:
            err = (x - exact).abs().max().item()
            tol = 0.06 if base in ("euler", "ddim") else 0.01  # first- vs higher-order methods
            assert err < tol, f"{where}: max error {err:.3f} against the exact flow map"
        mean_err = (x.mean(0) - mu).abs().max().item()
        assert mean_err < 5 * s / math.sqrt(n) + 0.01, f"{where}: mean off by {mean_err:.3f}"
        sd_err = (x.std(0) / law_sd - 1).abs().max().item()
        assert sd_err < 4 / math.sqrt(2 * n) + 0.02, f"{where}: std off by {100 * sd_err:.1f}%"


def _chain_law(times, step_noise, slope, mean_shift, m, v):
    """Mean and variance of an affine-Gaussian chain x' = A x + c + sd xi, pushed step by step (1-d)."""
    for t, t_next in zip(times[:-1], times[1:]):
        a_k, c_k, sd = slope(t, t_next), mean_shift(t, t_next), step_noise(t, t_next)
        m, v = a_k * m + c_k, a_k**2 * v + sd**2
    return m, v


@pytest.mark.parametrize(
    "name,settings",
    [
        ("ddpm", dict(eta=1.0, steps=40)),
        ("ddim_eta_half", dict(eta=0.5, steps=40)),
        ("em_constant", dict(steps=60, sigma=1.0, sigma_schedule="constant")),
        ("em_beta", dict(steps=60, sigma=1.5, sigma_schedule="beta")),
    ],
)
def test_stochastic_samplers_have_the_exact_law_of_their_chain(name, settings):
    """With the exact Gaussian field every stochastic step is affine-Gaussian, so the law of the whole chain is known
    in closed form: pushed here through formulas written out independently of the sampler code (the DDIM paper's
    sigma in its VP notation, alpha_bar = alpha^2 on the cosine path; Euler-Maruyama's drift slope). 50,000 samples
    in float64 must match its mean and standard deviation within 4 standard errors (0.3% for the std): dropping
    the beta'/beta factor of DDIM's noise, or the sigma^2 / 2 of the drift, is hundreds of standard errors off."""
    schedule = CosineSchedule()
    path = GaussianPath(schedule)
    mu, s, n = 0.7, 0.5, 50_000
    oracle = GaussianOracle(schedule, torch.tensor([mu], dtype=torch.float64), s)
    sampler = _make({"ddpm": "ddim_eta1", "ddim_eta_half": "ddim_eta1"}.get(name, name), path)
    for key, value in settings.items():
        setattr(sampler, key, value)
    _, velocity, score = _fields(oracle, path, "cfm")
    t0 = 0.05
    a0, b0 = math.sin(math.pi * t0 / 2), math.cos(math.pi * t0 / 2)
    m0, v0 = a0 * mu, a0**2 * s**2 + b0**2
    g = torch.Generator().manual_seed(11)
    x0 = m0 + math.sqrt(v0) * torch.randn(n, 1, dtype=torch.float64, generator=g)
    out = sampler.sample(velocity, x0, score_fn=score, t_span=(t0, 0.98), generator=g)
    times = out.times.tolist()

    def coeffs(t):
        a, b = math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
        return a, b, math.pi / 2 * b, -math.pi / 2 * a, a**2 * s**2 + b**2  # alpha, beta, d_alpha, d_beta, var

    if name.startswith("dd"):
        eta = settings["eta"]

        def noise(t, t_next):  # DDIM paper, eq. 16: sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')
            ab, ab2 = coeffs(t)[0] ** 2, coeffs(t_next)[0] ** 2
            return eta * math.sqrt((1 - ab2) / (1 - ab)) * math.sqrt(1 - ab / ab2)

        def parts(t, t_next):  # z_hat = mu + a s^2 r / var, eps_hat = b r / var, r = x - a mu
            a, b, _, _, var = coeffs(t)
            a2, b2 = coeffs(t_next)[:2]
            k_eps = math.sqrt(b2**2 - noise(t, t_next) ** 2)
            slope = a2 * a * s**2 / var + k_eps * b / var
            return slope, a2 * mu - slope * a * mu

    else:
        sigma, beta_schedule = settings["sigma"], settings["sigma_schedule"] == "beta"

        def noise(t, t_next):
            return (sigma * coeffs(t)[1] if beta_schedule else sigma) * math.sqrt(t_next - t)

        def parts(t, t_next):  # drift u + sigma^2 / 2 score, both affine in x: u' = (a da s^2 + b db) / var
            a, b, da, db, var = coeffs(t)
            sig2 = (sigma * b if beta_schedule else sigma) ** 2
            h = t_next - t
            slope = 1 + h * ((a * da * s**2 + b * db) / var - 0.5 * sig2 / var)
            shift = h * (da * mu - (a * da * s**2 + b * db) * a * mu / var + 0.5 * sig2 * a * mu / var)
            return slope, shift

    m, v = _chain_law(times, noise, lambda t, tn: parts(t, tn)[0], lambda t, tn: parts(t, tn)[1], m0, v0)
    sd = math.sqrt(v)
    x = out.x[:, 0]
    mean_z = (x.mean().item() - m) / (sd / math.sqrt(n))
    sd_z = (x.std().item() / sd - 1) * math.sqrt(2 * n)
    assert abs(mean_z) < 4 and abs(sd_z) < 4, f"{name}: mean {mean_z:+.1f} SE, std {sd_z:+.1f} SE (law sd {sd:.4f})"
