import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_ENCODER, tiny_batch, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, BertConfig, BertForMaskedLM

from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration


def test_forward_shapes_and_losses(model, config):
    batch = tiny_batch(config)
    out = model(**batch)
    assert out.logits.shape == (3, 7, config.decoder_vocab_size)
    assert out.count_mu.shape == (3, config.num_target_genes)
    assert out.count_zi_logits.shape == (3, config.num_target_genes)
    assert out.count_theta.shape == (config.num_target_genes,)
    assert out.cell_embeddings.shape == (3, config.decoder_hidden_size)
    assert out.encoder_last_hidden_state.shape == (3, 11, config.decoder_hidden_size)
    torch.testing.assert_close(out.loss, out.token_loss + out.count_loss)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # mu is proportions x library size: its rows sum to the predicted library size.
    torch.testing.assert_close(out.count_mu.sum(-1), out.library_size)


def test_no_losses_without_targets(model, config):
    batch = tiny_batch(config)
    out = model(
        batch["input_ids"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_time_values=batch["decoder_time_values"],
    )
    assert out.loss is None and out.token_loss is None and out.count_loss is None
    assert not model(**batch, return_dict=False)[0].isnan()


def test_loss_reaches_every_trainable_parameter_and_no_frozen_one(config):
    # The zero-initialised output maps (source path, per-gene readout) pass no gradient back until they have moved
    # off zero, as they do after the first step: give them the weights they would have then.
    model = _with_live_source_path(PerturbGenForConditionalGeneration(config)).train()
    model(**tiny_batch(config)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("encoder."))


def test_unfrozen_encoder_trains(config):
    config = tiny_config(freeze_encoder=False)
    model = PerturbGenForConditionalGeneration(config).train()
    assert model.encoder.training
    model(**tiny_batch(config)).loss.backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None


def test_frozen_encoder_stays_in_eval_mode(config):
    model = PerturbGenForConditionalGeneration(config).train()
    assert model.decoder.training and not model.encoder.training


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "mse"])
@pytest.mark.parametrize("library", ["predicted", "observed"])
def test_every_count_head_variant_trains(likelihood, library):
    config = tiny_config(count_likelihood=likelihood, library_size=library)
    model = PerturbGenForConditionalGeneration(config).train()
    batch = tiny_batch(config)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.count_loss)
    assert (out.count_zi_logits is None) == (likelihood != "zinb")
    if library == "observed":
        torch.testing.assert_close(out.library_size, batch["target_counts"].sum(-1))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_padding_invariance(norm):
    config = tiny_config(decoder_norm=norm)
    model = PerturbGenForConditionalGeneration(config).eval()
    batch = tiny_batch(config)
    reference = model(**batch)
    padded = dict(batch)
    padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, 5))
    padded["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, 5))
    padded["decoder_input_ids"] = torch.nn.functional.pad(batch["decoder_input_ids"], (0, 4))
    padded["labels"] = torch.nn.functional.pad(batch["labels"], (0, 4), value=-100)
    padded["context_input_ids"] = torch.nn.functional.pad(batch["context_input_ids"], (0, 3))
    out = model(**padded)
    real = batch["decoder_input_ids"] != 0
    torch.testing.assert_close(out.logits[:, :7][real], reference.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.count_mu, reference.count_mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_context_changes_the_prediction(model, config):
    batch = tiny_batch(config)
    with_context = model(**batch).logits
    batch.pop("context_input_ids")
    batch.pop("context_time_values")
    assert not torch.allclose(with_context, model(**batch).logits)


def test_time_value_changes_the_prediction(model, config):
    batch = tiny_batch(config)
    early = model(**batch).logits
    batch["decoder_time_values"] = torch.full((3,), 5.0)  # between trained points: allowed
    assert not torch.allclose(early, model(**batch).logits)


def test_save_and_load_round_trip(tmp_path, model, config):
    batch = tiny_batch(config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    for auto_class in (AutoModel, AutoModelForSeq2SeqLM, PerturbGenForConditionalGeneration):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is PerturbGenForConditionalGeneration
        out, ref = loaded(**batch), model(**batch)
        assert torch.equal(out.logits, ref.logits)
        assert torch.equal(out.count_mu, ref.count_mu)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PerturbGenConfig)


def test_auto_map_lists_every_auto_class(tmp_path, model):
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_perturbgen.PerturbGenConfig",
        "AutoModel": "modeling_perturbgen.PerturbGenForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_perturbgen.PerturbGenForConditionalGeneration",
    }
    for name in (
        "modeling_perturbgen.py",
        "configuration_perturbgen.py",
        "masking_perturbgen.py",
        "likelihoods_perturbgen.py",
    ):
        assert (tmp_path / name).is_file()


def test_remote_code_loads_without_the_package(tmp_path, model, config):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    batch = tiny_batch(config)
    expected = model(**batch).logits.detach().numpy()
    torch.save(batch, tmp_path / "batch.pt")
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["perturbgen_hf"] = None  # the package must not be importable here
        try:
            import perturbgen_hf
            raise SystemExit("perturbgen_hf was importable")
        except ImportError:
            pass
        import numpy as np, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        logits = model(**batch).logits.detach().numpy()
        np.testing.assert_allclose(logits, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-6)
        out = model.generate(batch["input_ids"], sequence_length=4, generator=torch.Generator().manual_seed(0))
        assert out.sequences.shape == (3, 3, 4)
        print("REMOTE-OK")
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def _tiny_geneformer(path, safe):
    torch.manual_seed(1)
    bert_config = BertConfig(**TINY_ENCODER, pad_token_id=0)
    masked_lm = BertForMaskedLM(bert_config).eval()
    masked_lm.save_pretrained(path)
    if not safe:
        # Legacy Geneformer checkpoints ship pytorch_model.bin.
        state = {k: v.clone() for k, v in masked_lm.state_dict().items()}
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
    return masked_lm


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_from_geneformer_reproduces_the_encoder(tmp_path, safe):
    masked_lm = _tiny_geneformer(tmp_path, safe)
    model = PerturbGenForConditionalGeneration.from_geneformer(
        tmp_path,
        decoder_hidden_size=32,
        decoder_num_heads=4,
        decoder_num_layers=1,
        decoder_intermediate_size=37,
        num_target_genes=20,
        time_points=["6h"],
        time_values=[6.0],
    ).eval()
    ids = torch.tensor([[2, 9, 14, 40, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3]])
    mask = (ids != 0).long()
    expected = masked_lm.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    actual = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert model.encoder_to_decoder is not None  # 24 -> 32
    assert model.encode(ids, mask).shape == (2, 7, 32)


def test_from_geneformer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PerturbGenForConditionalGeneration.from_geneformer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        PerturbGenForConditionalGeneration.from_geneformer(tmp_path)


def test_bad_inputs_are_reported(model, config):
    batch = tiny_batch(config)
    bad = dict(batch, decoder_input_ids=batch["decoder_input_ids"] + 100)
    with pytest.raises(ValueError, match="decoder vocabulary"):
        model(**bad)
    bad = dict(batch, input_ids=batch["input_ids"] + 1000)
    with pytest.raises(ValueError, match="encoder vocabulary"):
        model(**bad)
    with pytest.raises(ValueError, match="decoder_time_values"):
        model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    observed = PerturbGenForConditionalGeneration(tiny_config(library_size="observed")).eval()
    with pytest.raises(ValueError, match="library_size"):
        observed.generate(batch["input_ids"], sequence_length=3)


def test_source_rank_weights_follow_the_edits():
    from perturbgen_hf.modeling.modeling_perturbgen import source_rank_weights

    # <cls> g10 g11 <mask> g12 <eos> <pad>
    ids = torch.tensor([[2, 10, 11, 1, 12, 3, 0]])
    presence, rank = source_rank_weights(ids, first_gene_id=4, mask_token_id=1)
    assert presence.tolist() == [[0, 1, 1, 0, 1, 0, 0]]
    # Ranks 1, 2, (mask holds rank 3), 4.
    expected = torch.tensor([[0, 1.0, 1 / np.log2(3), 0, 1 / np.log2(5), 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(rank, expected)


def _with_live_source_path(model, seed=0):
    """Give the zero-initialised maps (the linear source path's embeddings, or the normalised one's output map) random
    weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    path = model.source_path
    first = path.output if path.output is not None else path.presence_embeddings
    with torch.no_grad():
        for module in (first, model.count_head.source_proj, model.count_head.gene_readout[-1]):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("source_map", ["linear", "normalized"])
def test_one_source_gene_reaches_every_decoder_position_undiluted(source_map):
    config = tiny_config(source_path="presence", source_path_map=source_map)
    model = _with_live_source_path(PerturbGenForConditionalGeneration(config).eval())
    source = torch.tensor([[2, *range(10, 40), 3]])  # 30 genes
    deleted = torch.tensor([[2, *range(10, 25), *range(26, 40), 3, 0]])  # gene 25 deleted
    full, cut = model.condition_on_source(source), model.condition_on_source(deleted)
    # The sums differ by exactly the deleted gene's embedding (a sum, not a mean), before any normalisation.
    embeddings = model.source_path.presence_embeddings.weight
    raw = embeddings[10:40].sum(0, keepdim=True)
    raw_cut = raw - embeddings[25]
    normalise = model.source_path.norm or (lambda x: x)
    torch.testing.assert_close(full.summary, normalise(raw))
    torch.testing.assert_close(cut.summary, normalise(raw_cut))
    # The decoder's input embeddings at every position move by the same shift.
    tokens, times = torch.tensor([[5, 6, 7, 1]]), torch.tensor([1.0])
    moved = model.decoder.embed(tokens, times, full) - model.decoder.embed(tokens, times, cut)
    torch.testing.assert_close(moved, (full.shift - cut.shift)[:, None, :].expand_as(moved))
    assert (full.shift - cut.shift).abs().max() > 1e-3
    # The knockout changes the predicted counts, through the decoder and the count head.
    kwargs = {"sequence_length": 6, "temperature": 0.0, "num_iterations": 2}
    counts = model.generate(source, **kwargs).counts
    assert not torch.allclose(counts, model.generate(deleted, **kwargs).counts)


def test_a_model_saved_before_the_source_path_loads_unchanged(tmp_path):
    old = PerturbGenForConditionalGeneration(tiny_config(source_path="none", count_readout="pooled")).eval()
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("source_path", "source_path_injection", "source_path_map", "count_head_reads_source", "count_readout"):
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    new = PerturbGenForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert new.config.source_path == "presence" and new.source_path is not None
    source = torch.tensor([[2, *range(10, 30), 3], [2, *range(30, 45), 3, 0, 0, 0, 0, 0]])
    kwargs = {"sequence_length": 6, "generator": torch.Generator().manual_seed(0)}
    first = old.generate(source, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    second = new.generate(source, **kwargs)
    assert torch.equal(first.sequences, second.sequences)
    torch.testing.assert_close(first.counts, second.counts)


def test_per_gene_readout_moves_only_the_genes_it_reads():
    config = tiny_config(source_path="presence")
    model = _with_live_source_path(PerturbGenForConditionalGeneration(config).eval())
    head = model.count_head
    pooled = torch.randn(1, config.decoder_hidden_size)
    states = torch.randn(1, 3, config.decoder_hidden_size)
    index = torch.tensor([[2, 5, -1]])  # genes 2 and 5, then a non-gene position
    base = head(pooled)
    read = head(pooled, gene_states=states, gene_index=index)
    changed = (read["zi_logits"] - base["zi_logits"]).abs()[0] > 0
    assert changed.nonzero().flatten().tolist() == [2, 5]
    corrections = head.gene_readout(states)[0]
    torch.testing.assert_close(read["zi_logits"][0, [2, 5]] - base["zi_logits"][0, [2, 5]], corrections[:2, 1])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("source_path", "mean"),
        ("source_path_injection", "concat"),
        ("count_readout", "token"),
        ("count_head_reads_source", "yes"),
        ("source_path_map", "mlp"),
    ],
)
def test_bad_source_path_settings(name, value):
    with pytest.raises(ValueError, match=name):
        tiny_config(**{name: value})
