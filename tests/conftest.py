import os


# Tests never reach the network: an uncached Hub lookup fails at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib

import pytest
import torch

from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration


SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Distinct small sizes so that a transposed dimension shows up as a shape error.
TINY_ENCODER = {
    "vocab_size": 61,
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 40,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_config(**overrides) -> PerturbGenConfig:
    kwargs = {
        "encoder": dict(TINY_ENCODER),
        "decoder_hidden_size": 32,
        "decoder_num_layers": 2,
        "decoder_num_heads": 4,
        "decoder_head_dim": 6,
        "decoder_intermediate_size": 37,
        "decoder_max_position_embeddings": 48,
        "time_points": ["2h", "4h", "6h"],
        "time_values": [2.0, 4.0, 6.0],
        "num_target_genes": 30,
        "condition_tokens": ["donor=A", "donor=B"],
    }
    kwargs.update(overrides)
    return PerturbGenConfig(**kwargs)


def tiny_batch(config: PerturbGenConfig, batch_size=3, source_len=11, target_len=7, seed=0):
    """Source cells (encoder ids), masked targets with labels, one context time point and target counts."""
    g = torch.Generator().manual_seed(seed)
    first_gene = config.first_gene_token_id
    src = torch.randint(4, config.encoder.vocab_size, (batch_size, source_len), generator=g)
    src[:, 0], src[:, -1] = 2, 3
    src[-1, source_len - 4 :] = 0  # one shorter cell
    src[-1, source_len - 5] = 3
    genes = torch.stack(
        [torch.randperm(config.num_target_genes, generator=g)[:target_len] + first_gene for _ in range(batch_size)]
    )
    target = genes.clone()
    target[:, 0] = config.first_condition_token_id  # a condition token in front
    target[-1, target_len - 2 :] = 0
    labels = torch.full_like(target, -100)
    masked = torch.zeros_like(target, dtype=torch.bool)
    masked[:, 2:4] = True
    labels[masked] = target[masked]
    decoder_input_ids = target.masked_fill(masked, config.mask_token_id)
    context = torch.stack(
        [torch.randperm(config.num_target_genes, generator=g)[:5] + first_gene for _ in range(batch_size)]
    )[:, None, :]
    return {
        "input_ids": src,
        "attention_mask": (src != 0).long(),
        "decoder_input_ids": decoder_input_ids,
        "decoder_time_values": torch.tensor([4.0] * batch_size),
        "context_input_ids": context,
        "context_time_values": torch.tensor([[2.0]] * batch_size),
        "labels": labels,
        "target_counts": torch.poisson(torch.full((batch_size, config.num_target_genes), 3.0), generator=g),
    }


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return PerturbGenForConditionalGeneration(config).eval()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"The shared data folder {SHARED_DATA} is missing: tests on real data need ../shared/data.")
    return SHARED_DATA


def train_tiny_shalek(folder, max_source_length, max_target_length, gene_id_key=None, include_genes=(), steps=6):
    """Tokenize the Shalek time course (source 1h, 60 genes plus `include_genes`) into `folder / "tokens"` and train
    a `tiny` model for `steps` steps into `folder / "model"`; returns the model folder."""
    from perturbgen_hf.data import tokenize_anndata
    from perturbgen_hf.training import main as train_main

    tokenize_anndata(
        SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad",
        folder / "tokens",
        time_key="time",
        time_value_key="time_h",
        source="1h",
        gene_id_key=gene_id_key,
        n_hvg=60,
        include_genes=list(include_genes),
        progress=False,
    )
    argv = [
        "--data",
        str(folder / "tokens"),
        "--out",
        str(folder / "model"),
        "--preset",
        "tiny",
        "--max_steps",
        str(steps),
        "--max_source_length",
        str(max_source_length),
        "--max_target_length",
        str(max_target_length),
        "--use_cpu",
        "--report_to",
        "none",
        "--eval_fraction",
        "0",
        "--seed",
        "0",
    ]
    assert train_main(argv) == 0
    return folder / "model"
