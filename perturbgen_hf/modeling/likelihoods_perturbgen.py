"""
Count likelihoods of the PerturbGen count head, as pure tensor functions.

Parametrisation (as scVI): mean `mu > 0`, inverse dispersion `theta > 0` (variance `mu + mu^2 / theta`) and, for the
zero-inflated model, the logit `zi_logits` of the probability that a count is a structural zero.
"""

import contextlib

import torch
import torch.nn.functional as F


def negative_binomial_log_prob(
    counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""
    Log-probability of counts under a negative binomial with mean `mu` and inverse dispersion `theta`.

    `log NB(x; mu, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta * (log theta - log(theta + mu)) + x * (log mu - log(theta + mu))`.

    Args:
        counts (`torch.Tensor` of shape `(batch_size, num_genes)`):
            Non-negative counts (integers stored as floats).
        mu (`torch.Tensor` of shape `(batch_size, num_genes)`):
            Means.
        theta (`torch.Tensor` broadcastable to `mu`):
            Inverse dispersions.
        eps (`float`, *optional*, defaults to 1e-8):
            Added inside logarithms so that `mu = 0` stays finite.

    Returns:
        `torch.Tensor` of the broadcast shape: element-wise log-probabilities.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + counts * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )


def zero_inflated_negative_binomial_log_prob(
    counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""
    Log-probability of counts under a zero-inflated negative binomial.

    With `pi = sigmoid(zi_logits)`: `p(0) = pi + (1 - pi) NB(0)` and `p(x) = (1 - pi) NB(x)` for `x > 0`. Both
    branches are written with `softplus` so that large `|zi_logits|` stay finite.

    Args:
        counts (`torch.Tensor` of shape `(batch_size, num_genes)`):
            Non-negative counts.
        mu (`torch.Tensor` of shape `(batch_size, num_genes)`):
            Means of the negative-binomial component.
        theta (`torch.Tensor` broadcastable to `mu`):
            Inverse dispersions.
        zi_logits (`torch.Tensor` of shape `(batch_size, num_genes)`):
            Logits of the zero-inflation probability.
        eps (`float`, *optional*, defaults to 1e-8):
            Added inside logarithms.

    Returns:
        `torch.Tensor` of the broadcast shape: element-wise log-probabilities.
    """
    softplus_neg_pi = F.softplus(-zi_logits)  # -log(1 - pi)
    log_theta_mu = torch.log(theta + mu + eps)
    log_nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)  # log NB(0)
    # log(pi + (1 - pi) NB(0)) = log(exp(zi) + NB(0)) - log(1 + exp(zi))
    log_prob_zero = F.softplus(log_nb_zero - zi_logits) - softplus_neg_pi
    log_prob_nonzero = (
        -softplus_neg_pi
        - zi_logits
        + log_nb_zero
        + counts * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
    return torch.where(counts == 0, log_prob_zero, log_prob_nonzero)


def zero_inflated_negative_binomial_mean(mu: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """Mean `(1 - sigmoid(zi_logits)) * mu` of a zero-inflated negative binomial."""
    return torch.sigmoid(-zi_logits) * mu


def sample_negative_binomial(
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Draw counts from a (zero-inflated) negative binomial as a Gamma-Poisson mixture.

    Args:
        mu (`torch.Tensor`): means. theta (`torch.Tensor`, broadcastable): inverse dispersions.
        zi_logits (`torch.Tensor`, *optional*): zero-inflation logits; omitted for a plain negative binomial.
        generator (`torch.Generator`, *optional*): source of randomness, for reproducible draws.

    Returns:
        `torch.Tensor` shaped like `mu`: sampled counts (float).
    """
    theta = theta.expand_as(mu)
    # Gamma(shape=theta, scale=mu/theta) has mean mu.
    with _global_rng_from(generator, mu.device):
        rate = torch._standard_gamma(theta) / theta * mu
        counts = torch.poisson(rate)
    if zi_logits is not None:
        uniform = (
            torch.rand(mu.shape, generator=generator, device=mu.device)
            if generator is not None
            else torch.rand_like(mu)
        )
        counts = torch.where(uniform < torch.sigmoid(zi_logits), torch.zeros_like(counts), counts)
    return counts


def sample_poisson(rate: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Draw Poisson counts around `rate` (reproducibly under `generator`, leaving the caller's global RNG untouched).

    Args:
        rate (`torch.Tensor`): the expected counts. generator (`torch.Generator`, *optional*).

    Returns:
        `torch.Tensor` shaped like `rate`: sampled counts (float).
    """
    with _global_rng_from(generator, rate.device):
        return torch.poisson(rate.clamp(min=0))


@contextlib.contextmanager
def _global_rng_from(generator, device):
    """
    Torch's gamma and Poisson samplers take no generator: inside this block the global RNG is seeded from
    `generator` (when given), in a fork that leaves the caller's global RNG state untouched.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()) if generator is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


__all__ = [
    "negative_binomial_log_prob",
    "sample_negative_binomial",
    "sample_poisson",
    "zero_inflated_negative_binomial_log_prob",
    "zero_inflated_negative_binomial_mean",
]
