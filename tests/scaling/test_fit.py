"""The fitters against published optima (Epoch's refit of Chinchilla) and against laws they must recover."""

from __future__ import annotations

import numpy as np
import pytest
from chinchilla_data import epoch_runs

from lmforge.config import UserError
from lmforge.scaling.fit import (
    bootstrap_chinchilla,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    hoffmann_grid,
    huber_objective,
)
from lmforge.scaling.laws import EPOCH, HOFFMANN, ChinchillaLaw, PowerLaw

OPTIMUM = 1.0183e-3  # summed Huber (δ = 1e-3) at Epoch's optimum


def assert_epoch_optimum(fit):
    law = fit.law
    assert law.A == pytest.approx(477.8, abs=5)
    assert law.B == pytest.approx(2144, abs=25)
    assert law.E == pytest.approx(1.8172, abs=2e-3)
    assert law.alpha == pytest.approx(0.3473, abs=2e-3)
    assert law.beta == pytest.approx(0.3672, abs=2e-3)
    assert fit.objective <= OPTIMUM


def test_subsampled_grid_reaches_epoch_optimum():
    n, d, loss = epoch_runs()
    assert len(n) == 240
    fit = fit_chinchilla(n, d, loss, starts=hoffmann_grid()[::90])  # 50 of the 4,500 starts
    assert_epoch_optimum(fit)


@pytest.mark.slow
def test_full_hoffmann_grid_reaches_epoch_optimum():
    n, d, loss = epoch_runs()
    fit = fit_chinchilla(n, d, loss)
    assert fit.n_starts == 4500
    assert_epoch_optimum(fit)


def test_started_at_hoffmann_values_it_does_not_stop_early():
    n, d, loss = epoch_runs()
    from scipy.optimize import minimize

    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta0 = np.array([np.log(HOFFMANN.A), np.log(HOFFMANN.B), np.log(HOFFMANN.E), HOFFMANN.alpha, HOFFMANN.beta])
    default = minimize(huber_objective, theta0, args=args, jac=True, method="L-BFGS-B")
    assert default.fun > 1.1e-3  # scipy's default tolerances stop near Hoffmann's A ≈ 406: the trap
    assert np.exp(default.x[0]) == pytest.approx(406, abs=5)
    assert_epoch_optimum(fit_chinchilla(n, d, loss, starts=[HOFFMANN]))


def test_epochs_printed_likelihood_fit_is_not_this_objectives_optimum():
    n, d, loss = epoch_runs()
    printed = np.array([np.log(482.0), np.log(2085.4), np.log(1.8172), 0.3478, 0.3658])
    value, _ = huber_objective(printed, np.log(n), np.log(d), np.log(loss))
    assert value == pytest.approx(1.0228e-3, rel=1e-3)
    assert value > OPTIMUM


def test_huber_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_n, log_d = rng.uniform(15, 25, 30), rng.uniform(18, 28, 30)
    log_loss = np.log(EPOCH.loss(np.exp(log_n), np.exp(log_d))) + rng.normal(0, 2e-3, 30)
    theta = np.array([6.0, 7.5, 0.6, 0.33, 0.36])
    _, grad = huber_objective(theta, log_n, log_d, log_loss)
    eps = 1e-7
    numeric = [
        (huber_objective(theta + eps * e, log_n, log_d, log_loss)[0]
         - huber_objective(theta - eps * e, log_n, log_d, log_loss)[0]) / (2 * eps)
        for e in np.eye(5)
    ]  # fmt: skip
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-12)


def test_recovers_a_known_law_and_bootstrap_covers_it():
    rng = np.random.default_rng(1)
    n = np.exp(rng.uniform(np.log(1e6), np.log(1e9), 60))
    d = np.exp(rng.uniform(np.log(1e8), np.log(1e11), 60))
    loss = EPOCH.loss(n, d) * np.exp(rng.normal(0, 5e-4, 60))
    fit = fit_chinchilla(n, d, loss, starts=hoffmann_grid()[::150])
    assert fit.law.alpha == pytest.approx(EPOCH.alpha, abs=0.02)
    assert fit.law.beta == pytest.approx(EPOCH.beta, abs=0.02)
    assert fit.law.E == pytest.approx(EPOCH.E, abs=0.03)
    intervals = bootstrap_chinchilla(n, d, loss, fit, samples=40)
    for name in ("E", "alpha", "beta"):
        lo, hi = intervals[name]
        assert lo <= getattr(EPOCH, name) <= hi, name


def test_frontier_is_the_brute_force_minimum_and_compute_for_loss_inverts_it():
    for law in (HOFFMANN, EPOCH):
        n_opt, d_opt = law.optimal(1e21)
        assert 6 * n_opt * d_opt == pytest.approx(1e21)
        ns = np.geomspace(1e8, 1e11, 200_001)
        brute = ns[np.argmin(law.loss(ns, 1e21 / (6 * ns)))]
        assert n_opt == pytest.approx(brute, rel=1e-4)
        assert law.loss_at_compute(1e21) == pytest.approx(law.loss(n_opt, d_opt))
        assert law.compute_for_loss(law.loss_at_compute(3e22)) == pytest.approx(3e22, rel=1e-9)
    with pytest.raises(UserError, match="irreducible.*ask for a loss above E"):
        EPOCH.compute_for_loss(1.5)


def test_isoflop_parabolas_recover_the_frontier_exponent():
    law = ChinchillaLaw(E=1.8, A=400.0, B=1200.0, alpha=0.35, beta=0.35)
    budgets = [1e18, 1e19, 1e20, 1e21]
    c, n, loss = [], [], []
    for budget in budgets:
        n_opt, _ = law.optimal(budget)
        for k in np.geomspace(0.25, 4, 7):
            c.append(budget), n.append(n_opt * k), loss.append(law.loss(n_opt * k, budget / (6 * n_opt * k)))
    fit = fit_isoflop(c, n, loss)
    assert len(fit.parabolas) == 4 and all(p.bracketed for p in fit.parabolas)
    assert fit.n_exponent == pytest.approx(law.beta / (law.alpha + law.beta), abs=0.01)
    for p in fit.parabolas:
        assert p.n_opt == pytest.approx(law.optimal(p.compute)[0], rel=0.05)
        assert p.loss_min == pytest.approx(law.loss_at_compute(p.compute), rel=2e-3)
    assert fit.loss_curve is not None


def test_isoflop_refuses_a_budget_without_a_minimum():
    with pytest.raises(UserError, match="both sides"):
        fit_isoflop([1e18] * 3 + [1e19] * 3, [1, 2, 4, 1, 2, 4], [3.0, 3.5, 3.8, 2.0, 2.5, 2.7])


def test_power_law_recovers_its_parameters_and_solves_for_x():
    truth = PowerLaw(a=5.0, b=-0.4, c=2.5)
    x = np.geomspace(10, 1e5, 12)
    fit = fit_power_law(x, truth(x))
    assert (fit.a, fit.b, fit.c) == pytest.approx((5.0, -0.4, 2.5), rel=1e-4)
    assert fit.solve(fit(1234.0)) == pytest.approx(1234.0, rel=1e-6)
    with pytest.raises(UserError, match="saturates"):
        fit.solve(2.0)
    with pytest.raises(UserError, match="needs ≥ 3 points"):
        fit_power_law(x[:2], truth(x[:2]))
    with pytest.raises(ValueError, match="one value each") as bug:  # only a caller's code can pass these
        fit_power_law(x, truth(x)[:-1])
    assert not isinstance(bug.value, UserError)
    assert fit_power_law(x, truth(x), floor=2.5).b == pytest.approx(-0.4, rel=1e-6)
