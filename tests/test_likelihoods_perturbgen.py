import numpy as np
import pytest
import torch
from scipy import stats

from perturbgen_hf.modeling import (
    negative_binomial_log_prob,
    sample_negative_binomial,
    sample_poisson,
    zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_mean,
)


COUNTS = np.array([0, 1, 2, 5, 17, 120, 0, 3], dtype=np.float64)
MU = np.array([0.3, 1.0, 4.0, 5.5, 10.0, 90.0, 25.0, 0.01])
THETA = np.array([0.5, 2.0, 1.0, 10.0, 0.2, 3.0, 50.0, 1.5])
ZI_LOGITS = np.array([-2.0, 0.0, 1.5, -8.0, 0.3, -1.0, 2.0, 0.7])


def scipy_nb(x, mu, theta):
    # scipy's nbinom(n, p): n successes, success probability p; mean n (1 - p) / p = mu.
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_negative_binomial_matches_scipy():
    ours = negative_binomial_log_prob(*(torch.tensor(a) for a in (COUNTS, MU, THETA)), eps=0.0)
    np.testing.assert_allclose(ours.numpy(), scipy_nb(COUNTS, MU, THETA), rtol=1e-10, atol=1e-10)


def test_zero_inflated_matches_mixture_reference():
    pi = 1.0 / (1.0 + np.exp(-ZI_LOGITS))
    reference = np.where(
        COUNTS == 0,
        np.log(pi + (1 - pi) * np.exp(scipy_nb(0, MU, THETA))),
        np.log(1 - pi) + scipy_nb(COUNTS, MU, THETA),
    )
    ours = zero_inflated_negative_binomial_log_prob(
        *(torch.tensor(a) for a in (COUNTS, MU, THETA, ZI_LOGITS)), eps=0.0
    )
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-9, atol=1e-9)


def test_zero_inflation_vanishes_for_very_negative_logits():
    args = [torch.tensor(a) for a in (COUNTS, MU, THETA)]
    zinb = zero_inflated_negative_binomial_log_prob(*args, torch.full((8,), -40.0, dtype=torch.float64))
    torch.testing.assert_close(zinb, negative_binomial_log_prob(*args), rtol=1e-9, atol=1e-9)


def test_probabilities_sum_to_one():
    x = torch.arange(0, 400, dtype=torch.float64)
    log_p = zero_inflated_negative_binomial_log_prob(
        x,
        torch.tensor(7.0, dtype=torch.float64),
        torch.tensor(1.3, dtype=torch.float64),
        torch.tensor(0.4, dtype=torch.float64),
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-8)


def test_extreme_parameters_stay_finite():
    x = torch.tensor([0.0, 1e4])
    out = zero_inflated_negative_binomial_log_prob(
        x, torch.tensor([1e-12, 1e6]), torch.tensor([1e-6, 1e5]), torch.tensor([80.0, -80.0])
    )
    assert torch.isfinite(out).all()


def test_sampling_is_reproducible_and_has_the_right_moments():
    mu, theta = torch.full((20000,), 6.0), torch.tensor(2.0)
    a = sample_negative_binomial(mu, theta, generator=torch.Generator().manual_seed(3))
    b = sample_negative_binomial(mu, theta, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.mean().item() == pytest.approx(6.0, rel=0.05)
    assert a.var().item() == pytest.approx(6.0 + 36.0 / 2.0, rel=0.1)
    zi = torch.full((20000,), 0.0)  # pi = 0.5
    c = sample_negative_binomial(mu, theta, zi, generator=torch.Generator().manual_seed(3))
    assert c.mean().item() == pytest.approx(zero_inflated_negative_binomial_mean(mu, zi)[0].item(), rel=0.06)


def test_poisson_sampling_is_reproducible_has_poisson_moments_and_leaves_the_global_rng_alone():
    rate = torch.cat([torch.full((20000,), 6.0), torch.zeros(10)])
    state = torch.get_rng_state()
    a = sample_poisson(rate, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, sample_poisson(rate, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, sample_poisson(rate, generator=torch.Generator().manual_seed(4)))
    assert a[:20000].mean().item() == pytest.approx(6.0, rel=0.03)
    assert a[:20000].var().item() == pytest.approx(6.0, rel=0.06)  # no extra dispersion, unlike the NB's 6 + 36/theta
    assert (a[20000:] == 0).all() and (a == a.round()).all()
