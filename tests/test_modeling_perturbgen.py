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
    model = PerturbGenForConditionalGeneration(config).train()
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
