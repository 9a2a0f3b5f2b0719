import torch

from perturbgen_hf.modeling import mask_ratio, num_masked_after_step, sample_training_mask
from perturbgen_hf.modeling.masking_perturbgen import first_occurrence, top_k_filter


def test_schedules_go_from_all_to_none_monotonically():
    r = torch.linspace(0, 1, 50)
    for schedule in ("cosine", "pow", "linear"):
        ratios = mask_ratio(r, schedule)
        assert ratios[0] == 1.0
        assert ratios[-1].item() < 1e-12
        assert (ratios[1:] <= ratios[:-1]).all()


def test_generation_steps_end_with_nothing_masked():
    lengths = torch.tensor([1, 7, 100])
    counts = [num_masked_after_step(i, 12, lengths) for i in range(12)]
    assert torch.equal(counts[-1], torch.zeros(3, dtype=torch.long))
    stacked = torch.stack(counts)
    assert (stacked[1:] <= stacked[:-1]).all()
    assert (stacked[0] <= lengths).all()


def test_training_mask_respects_maskable_and_is_seeded():
    maskable = torch.ones(64, 20, dtype=torch.bool)
    maskable[:, :2] = False  # condition tokens
    maskable[5, 10:] = False  # padding
    a = sample_training_mask(maskable, generator=torch.Generator().manual_seed(0))
    b = sample_training_mask(maskable, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not (a & ~maskable).any()
    assert (a.sum(1) >= 1).all()
    # Ratios are spread over (0, 1]: some sequences get few masks, some many.
    assert a.sum(1).min() < 6 < a.sum(1).max()


def test_first_occurrence_keeps_the_most_confident_duplicate():
    ids = torch.tensor([[5, 7, 5, 9, 5]])
    confidence = torch.tensor([[0.1, 0.5, 0.9, 0.2, 0.9]])
    candidate = torch.tensor([[True, True, True, False, True]])
    keep = first_occurrence(ids, confidence, candidate, vocab_size=10)
    assert keep.tolist() == [[False, True, True, False, False]]


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, True, False]]


def test_sample_categorical_follows_the_distribution_and_never_draws_banned_ids():
    from perturbgen_hf.modeling.masking_perturbgen import sample_categorical

    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))  # the last id is banned (-inf)
    logits = logits.expand(4000, 5, 4).contiguous()
    ids = sample_categorical(logits, 1.0, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids.flatten(), minlength=4).float() / ids.numel()
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.01, rtol=0)
    # a low temperature sharpens towards the argmax; 0 is the argmax
    cold = sample_categorical(logits, 0.05, torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.99
    assert (sample_categorical(logits, 0.0) == 0).all()
    # rows given the same noise row draw the same ids
    shared = sample_categorical(logits[:3], 1.0, torch.Generator().manual_seed(1), torch.tensor([2, 0, 2]), 3)
    assert torch.equal(shared[0], shared[2])
    full = sample_categorical(logits[:3], 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(shared[1], full[0]) and torch.equal(shared[0], full[2])
