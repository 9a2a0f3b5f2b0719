import pytest
import torch
from conftest import tiny_batch, tiny_config

from perturbgen_hf import PerturbGenForConditionalGeneration


def _generate(model, config, seed=0, **kwargs):
    batch = tiny_batch(config)
    kwargs.setdefault("sequence_length", torch.tensor([12, 5, 25]))
    return model.generate(
        batch["input_ids"], batch["attention_mask"], generator=torch.Generator().manual_seed(seed), **kwargs
    )


def test_shapes_and_time_order(model, config):
    out = _generate(model, config, time_points=["6h", "2h"])
    assert out.sequences.shape == (3, 2, 25)
    assert out.time_values.tolist() == [2.0, 6.0]
    assert out.counts.shape == (3, 2, config.num_target_genes)
    assert out.cell_embeddings.shape == (3, 2, config.decoder_hidden_size)
    assert torch.isfinite(out.counts).all() and (out.counts >= 0).all()


def test_deterministic_under_a_generator(model, config):
    a, b = _generate(model, config, seed=7), _generate(model, config, seed=7)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.counts, b.counts)
    c = _generate(model, config, seed=8)
    assert not torch.equal(a.sequences, c.sequences)


@pytest.mark.parametrize("schedule", ["cosine", "pow", "linear"])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 5.0])
def test_complete_unique_genes_and_no_masks(model, config, schedule, temperature):
    lengths = torch.tensor([12, 5, 30])  # 30 = every target gene: forces the duplicate resolution
    out = _generate(
        model, config, sequence_length=lengths, schedule=schedule, temperature=temperature, num_iterations=6, top_k=8
    )
    first, genes = config.first_gene_token_id, config.num_target_genes
    for cell in range(3):
        for t in range(3):
            seq = out.sequences[cell, t]
            assert (seq != config.mask_token_id).all()
            gene_tokens = seq[: lengths[cell]]
            assert ((gene_tokens >= first) & (gene_tokens < first + genes)).all()
            assert len(set(gene_tokens.tolist())) == len(gene_tokens)  # no gene twice in a cell
            assert (seq[lengths[cell] :] == config.pad_token_id).all()


def test_condition_tokens_are_kept(model, config):
    conditions = torch.tensor([[34], [35], [34]])
    out = _generate(model, config, condition_ids=conditions, sequence_length=6)
    assert torch.equal(out.sequences[:, :, 0], conditions.expand(3, 3))
    with pytest.raises(ValueError, match="condition-token ids"):
        _generate(model, config, condition_ids=torch.tensor([[5], [5], [5]]))


def test_default_length_follows_the_source_cell(model, config):
    out = _generate(model, config, sequence_length=None, time_points=["4h"])
    source_genes = (tiny_batch(config)["attention_mask"].sum(1) - 2).tolist()
    assert (out.sequences[:, 0] != 0).sum(1).tolist() == source_genes


def test_unseen_time_value(model, config):
    out = _generate(model, config, time_points=[3.0, 8.5])
    assert out.time_values.tolist() == [3.0, 8.5]
    with pytest.raises(ValueError, match="'10h'"):
        _generate(model, config, time_points=["10h"])


def test_encoder_once_and_memory_projection_once_per_time_point(model, config):
    calls = {"encoder": 0, "cross_kv": 0}
    model.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.decoder.layers[0].cross_attn.k_proj.register_forward_hook(
        lambda *a: calls.__setitem__("cross_kv", calls["cross_kv"] + 1)
    )
    _generate(model, config, num_iterations=10)
    assert calls["encoder"] == 1
    # per time point: the memory once; for the two earlier ones also the source-only memory of their context pass.
    assert calls["cross_kv"] == 3 + 2


def test_context_mode_none_generates_time_points_independently(config):
    model = PerturbGenForConditionalGeneration(tiny_config(context_mode="none")).eval()
    both = _generate(model, config, time_points=["2h", "6h"], temperature=0.0)
    alone = _generate(model, config, time_points=["6h"], temperature=0.0)
    assert torch.equal(both.sequences[:, 1], alone.sequences[:, 0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_iterations": 0}, "num_iterations"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"sequence_length": 31}, "exceeds"),
        ({"sequence_length": 0}, ">= 1"),
        ({"sequence_length": torch.tensor([3, 4])}, "2 entries for 3 cells"),
        ({"time_points": []}, "empty"),
        ({"time_points": ["2h", 2.0]}, "repeats"),
    ],
)
def test_bad_generation_arguments(model, config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _generate(model, config, **kwargs)


def test_noise_index_gives_each_cell_its_own_draws(model, config):
    batch = tiny_batch(config)
    lengths = torch.tensor([12, 5, 25])
    full = _generate(model, config, seed=3, sequence_length=lengths, temperature=5.0)
    same = _generate(model, config, seed=3, sequence_length=lengths, temperature=5.0, noise_index=torch.arange(3))
    assert torch.equal(full.sequences, same.sequences)  # arange draws exactly as no index
    # cells 2 and 0 alone, in another order, with their rows of a 3-row draw: the same predictions
    rows = torch.tensor([2, 0])
    subset = model.generate(
        batch["input_ids"][rows],
        batch["attention_mask"][rows],
        sequence_length=lengths[rows],
        temperature=5.0,
        generator=torch.Generator().manual_seed(3),
        noise_index=rows,
        num_noise_rows=3,
    )
    width = subset.sequences.shape[-1]
    assert torch.equal(subset.sequences, full.sequences[rows][..., :width])
    torch.testing.assert_close(subset.counts, full.counts[rows])
    with pytest.raises(ValueError, match="num_noise_rows"):
        model.generate(batch["input_ids"][rows], noise_index=rows, num_noise_rows=2)


def test_sequence_editor_edits_a_time_point_and_its_context(model, config):
    lengths = torch.tensor([12, 5, 25])

    def knock_out_first_gene(tokens, time_value):
        edited = tokens.clone()
        edited[:, 0] = config.mask_token_id
        return edited

    plain = _generate(model, config, seed=1, sequence_length=lengths, time_points=["2h", "6h"])
    edited = _generate(
        model,
        config,
        seed=1,
        sequence_length=lengths,
        time_points=["2h", "6h"],
        sequence_editor=knock_out_first_gene,
        edit_time_points=["2h"],
    )
    assert (edited.sequences[:, 0, 0] == config.mask_token_id).all()
    assert not torch.allclose(edited.counts[:, 0], plain.counts[:, 0])  # the edited state is read out
    assert not torch.equal(edited.sequences[:, 1], plain.sequences[:, 1]) or not torch.allclose(
        edited.counts[:, 1], plain.counts[:, 1]
    )  # and is the context of 6h
    with pytest.raises(ValueError, match="edit_time_points"):
        _generate(model, config, time_points=["2h"], sequence_editor=knock_out_first_gene, edit_time_points=["6h"])


def test_teacher_forced_readout(model, config):
    batch = tiny_batch(config)
    targets = torch.stack([batch["labels"].clamp(min=0), batch["labels"].clamp(min=0)], dim=1)
    targets = torch.where(targets >= config.first_gene_token_id, targets, torch.zeros_like(targets))
    out = model.readout(batch["input_ids"], targets, ["2h", "6h"], batch["attention_mask"])
    assert out.counts.shape == (3, 2, config.num_target_genes)
    assert torch.equal(out.sequences, targets)
    # with context, a time point's readout depends on the other given states ("previous": 6h reads 2h)
    changed = targets.clone()
    changed[:, 0] = 0
    other = model.readout(batch["input_ids"], changed, ["2h", "6h"], batch["attention_mask"])
    assert not torch.allclose(other.counts[:, 1], out.counts[:, 1])
    with pytest.raises(ValueError, match="distinct time points"):
        model.readout(batch["input_ids"], targets, ["2h"])
