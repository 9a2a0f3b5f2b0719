"""
MaskGIT masking, shared by training (which positions to mask) and generation (which positions to commit).

One schedule `gamma(r)` gives the fraction of a sequence that is still masked at progress `r` in [0, 1]:
`gamma(0) = 1` (all masked) and `gamma(1) = 0` (all committed). Training draws `r ~ U(0, 1)` and masks
`round(L * gamma(r))` positions (at least one); generation with `I` iterations leaves `floor(L * gamma((i + 1) / I))`
positions masked after step `i`. Keeping both in this module is what makes training and decoding agree.
"""

import math

import torch


SCHEDULES = ("cosine", "pow", "linear")


def mask_ratio(
    progress: torch.Tensor | float, schedule: str = "cosine", exponent: float = 2.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """
    Fraction of positions still masked at a given progress of decoding.

    Args:
        progress (`torch.Tensor` or `float`): progress `r` in [0, 1].
        schedule (`str`, *optional*, defaults to `"cosine"`): `"cosine"` cos(pi r / 2), `"pow"` 1 - r^exponent,
            `"linear"` 1 - r.
        exponent (`float`, *optional*, defaults to 2.0): exponent of the `"pow"` schedule.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`): precision of the computation (the original
            PerturbGen computes it in float32, which decides its re-mask counts).

    Returns:
        `torch.Tensor` shaped like `progress`, values in [0, 1].
    """
    r = torch.as_tensor(progress, dtype=dtype).clamp(0.0, 1.0)
    if schedule == "cosine":
        ratio = torch.cos(r * math.pi / 2)
    elif schedule == "pow":
        ratio = 1.0 - r**exponent
    elif schedule == "linear":
        ratio = 1.0 - r
    else:
        raise ValueError(f"Unknown mask schedule {schedule!r}; choose one of {list(SCHEDULES)}.")
    return ratio.clamp(0.0, 1.0)


def sample_training_mask(
    maskable: torch.Tensor,
    schedule: str = "cosine",
    exponent: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Choose the positions to mask for one training batch (MaskGIT: a random ratio per sequence).

    Args:
        maskable (`torch.BoolTensor` of shape `(batch_size, seq_len)`):
            Positions that may be masked (gene tokens; not padding, not condition tokens).
        schedule, exponent: see [`mask_ratio`].
        generator (`torch.Generator`, *optional*): for reproducible masks.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, seq_len)`: `True` where the token is replaced by `<mask>`. Each
        sequence with at least one maskable position gets at least one masked position.
    """
    batch_size, seq_len = maskable.shape
    device = _generator_device(generator, maskable.device)
    progress = torch.rand(batch_size, generator=generator, device=device).to(maskable.device)
    scores = torch.rand(batch_size, seq_len, generator=generator, device=device).to(maskable.device)
    return training_mask_from_uniforms(maskable, progress, scores, schedule, exponent)


def training_mask_from_uniforms(
    maskable: torch.Tensor,
    progress: torch.Tensor,
    scores: torch.Tensor,
    schedule: str = "cosine",
    exponent: float = 2.0,
) -> torch.Tensor:
    """
    [`sample_training_mask`] from given uniforms: `progress` `(batch_size,)` sets each sequence's ratio through the
    schedule; the positions with the smallest `scores` `(batch_size, seq_len)` are masked.
    """
    lengths = maskable.sum(dim=1)
    num_masked = torch.round(lengths.double() * mask_ratio(progress, schedule, exponent).to(maskable.device)).long()
    num_masked = torch.minimum(num_masked.clamp(min=1), lengths)
    ranks = scores.masked_fill(~maskable, float("inf")).argsort(dim=1).argsort(dim=1)
    return (ranks < num_masked[:, None]) & maskable


def num_masked_after_step(
    step: int, num_iterations: int, lengths: torch.Tensor, schedule: str = "cosine", exponent: float = 2.0
) -> torch.Tensor:
    """
    How many positions stay masked after decoding step `step` (0-based) of `num_iterations`.

    Args:
        step (`int`), num_iterations (`int`): the step and the total number of steps; after the last step the
            count is 0.
        lengths (`torch.LongTensor` of shape `(batch_size,)`): number of positions to generate per sequence.
        schedule, exponent: see [`mask_ratio`].

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`.
    """
    ratio = mask_ratio((step + 1) / num_iterations, schedule, exponent).item()
    return torch.floor(lengths.double() * ratio).long()


def sample_categorical(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    noise_index: torch.Tensor | None = None,
    num_noise_rows: int | None = None,
) -> torch.Tensor:
    """
    Sample one id per position from `softmax(logits / temperature)`; `temperature <= 0` is the argmax.

    Inverse-CDF sampling: one uniform draw per position (not one per vocabulary entry, as the Gumbel-max trick
    needs), so drawing the randomness costs `vocab` times less. Ids with `-inf` logits are never drawn.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, seq_len, vocab)`).
        temperature (`float`): sampling temperature.
        generator (`torch.Generator`, *optional*): source of the random draws.
        noise_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): row `i` uses the draws of row
            `noise_index[i]` of a draw made for `num_noise_rows` rows. Rows of a batch that are variants of the same
            cell (control and perturbed) then share their random draws exactly, whatever else the batch holds.
        num_noise_rows (`int`, *optional*): rows of that draw; defaults to `noise_index.max() + 1`.

    Returns:
        `torch.LongTensor` of shape `(batch_size, seq_len)`.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    shape = logits.shape[:-1]
    if noise_index is not None:
        rows = int(num_noise_rows) if num_noise_rows is not None else int(noise_index.max()) + 1
        shape = (rows, *logits.shape[1:-1])
    uniform = torch.rand(shape, generator=generator, device=_generator_device(generator, logits.device))
    if noise_index is not None:
        uniform = uniform[noise_index.to(uniform.device)]
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    # Scale by the total (not exactly 1 in floating point), and take the first id whose cumulative mass exceeds it.
    target = uniform.to(logits.device) * cumulative[..., -1]
    ids = torch.searchsorted(cumulative, target.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return ids.clamp_(max=logits.shape[-1] - 1)


def top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Set every logit outside the `top_k` largest of its row to `-inf` (no-op when `top_k` is None)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Confidence of a position: the probability margin `p_top1 - p_top2` of `softmax(logits)`."""
    top2 = logits.softmax(dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def first_occurrence(
    ids: torch.Tensor, confidence: torch.Tensor, candidate: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """
    Among candidate positions of a row that carry the same id, keep only the most confident (lowest position on
    ties), so that a step never commits one gene twice in a cell.

    Args:
        ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): proposed ids.
        confidence (`torch.Tensor` of shape `(batch_size, seq_len)`): their confidences.
        candidate (`torch.BoolTensor` of shape `(batch_size, seq_len)`): positions that take part.
        vocab_size (`int`): size of the id space.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, seq_len)`: the winning candidates.
    """
    batch_size, seq_len = ids.shape
    neg_inf = torch.finfo(confidence.dtype).min
    conf = confidence.masked_fill(~candidate, neg_inf)
    best = torch.full((batch_size, vocab_size), neg_inf, dtype=conf.dtype, device=ids.device)
    best = best.scatter_reduce(1, ids, conf, reduce="amax")
    is_best = candidate & (conf >= best.gather(1, ids))
    positions = torch.arange(seq_len, device=ids.device).expand(batch_size, seq_len)
    sentinel = torch.full((batch_size, vocab_size), seq_len, dtype=torch.long, device=ids.device)
    first = sentinel.scatter_reduce(1, ids, positions.masked_fill(~is_best, seq_len), reduce="amin")
    return is_best & (positions == first.gather(1, ids))


def _generator_device(generator, fallback):
    return generator.device if generator is not None else fallback


__all__ = [
    "SCHEDULES",
    "first_occurrence",
    "margin_confidence",
    "mask_ratio",
    "num_masked_after_step",
    "sample_categorical",
    "sample_training_mask",
    "top_k_filter",
    "training_mask_from_uniforms",
]
