import pytest
from conftest import tiny_config
from transformers import AutoConfig, BertConfig

from perturbgen_hf import PerturbGenConfig


def test_defaults_are_valid_and_geneformer_shaped():
    config = PerturbGenConfig()
    assert isinstance(config.encoder, BertConfig)
    assert (config.encoder.hidden_size, config.encoder.num_hidden_layers, config.encoder.vocab_size) == (
        512,
        12,
        20275,
    )
    assert config.decoder_head_dim == config.decoder_hidden_size // config.decoder_num_heads


def test_vocabulary_layout(config):
    assert config.first_gene_token_id == 4
    assert config.first_condition_token_id == 4 + 30
    assert config.decoder_vocab_size == 4 + 30 + 2


def test_target_genes_set_the_gene_count():
    config = tiny_config(target_genes=[f"ENSG{i:011d}" for i in range(12)], num_target_genes=2000)
    assert config.num_target_genes == 12
    with pytest.raises(ValueError, match="num_target_genes=5"):
        tiny_config(target_genes=["A", "B"], num_target_genes=5)


def test_round_trip_through_auto_config(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PerturbGenConfig)
    assert isinstance(loaded.encoder, BertConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()


def test_geneformer_config_dict_drops_in():
    geneformer = {
        "model_type": "bert",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 25426,
        "max_position_embeddings": 2048,
    }
    assert PerturbGenConfig(encoder=geneformer).encoder.vocab_size == 25426
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        PerturbGenConfig(encoder={"model_type": "gpt2"})


def test_time_value_lookup(config):
    assert config.time_value("4h") == 4.0
    assert config.time_value(5) == 5.0  # unseen time values are allowed
    with pytest.raises(ValueError, match="'10h'"):
        config.time_value("10h")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decoder_norm": "middle"}, "decoder_norm.*'middle'"),
        ({"count_likelihood": "poisson"}, "count_likelihood.*'poisson'"),
        ({"library_size": "fixed"}, "library_size.*'fixed'"),
        ({"mask_schedule": "exp"}, "mask_schedule.*'exp'"),
        ({"context_mode": "future"}, "context_mode.*'future'"),
        ({"decoder_num_layers": 0}, "decoder_num_layers.*0"),
        ({"decoder_hidden_size": 30, "decoder_num_heads": 4, "decoder_head_dim": None}, "not divisible"),
        ({"decoder_dropout": 1.5}, "decoder_dropout.*1.5"),
        ({"time_points": ["a", "a"], "time_values": [1, 2]}, "duplicates"),
        ({"time_points": ["a", "b"], "time_values": [2, 1]}, "strictly increasing"),
        ({"time_points": ["a", "b"], "time_values": [1]}, "1 values for 2 time points"),
        ({"target_genes": ["G1", "G1"], "num_target_genes": 2}, "duplicates.*G1"),
        ({"mask_token_id": 5}, "mask_token_id.*5"),
        ({"count_loss_weight": -1.0}, "count_loss_weight"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_configs_saved_with_the_old_library_size_name_load(tmp_path):
    # `library_size` (a mode) was renamed `library_size_source`: the tensor argument of forward/generate keeps the
    # name `library_size`. A folder saved before the rename loads with its value, and is saved with the new name.
    import json

    saved = PerturbGenConfig(num_target_genes=5).to_dict()
    saved.pop("library_size_source")
    saved["library_size"] = "observed"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = PerturbGenConfig.from_pretrained(tmp_path)
    assert config.library_size_source == "observed" and not hasattr(config, "library_size")
    config.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["library_size_source"] == "observed" and "library_size" not in written
