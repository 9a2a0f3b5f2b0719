"""
Train a small PerturbGen model on the Shalek et al. 2014 LPS time course on CPU, and score it against two trivial
references on the same validation batches (same cells, same masks, same definitions).

    python benchmarks/bench_train_shalek.py --workdir /tmp/train_shalek [--max-steps 300]

Source 1h; targets 2h, 4h, 6h; PerturbGen gc95M dictionaries; validation = 20% of source cells (per the pairing's
groups), all their pairs. References:
- token: each time point's gene-frequency distribution over the training targets (+1 smoothing); its cross entropy
  on the masked validation tokens, averaged per cell then over cells (the model's token_loss definition);
- count: a negative binomial per gene and time point with the training mean and a moment-matched dispersion; its
  negative log-likelihood per gene and cell on the validation counts (the model's count_nll definition).
Writes benchmarks/results/train_shalek.json.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from perturbgen_hf.data import tokenize_anndata
from perturbgen_hf.modeling import negative_binomial_log_prob
from perturbgen_hf.training import parse_arguments, train


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def reference_tables(dataset, time_values, vocab_size, num_genes, max_target_length):
    """Per time point: gene-token log-frequencies and per-gene NB means and inverse dispersions."""
    log_frequency, mean, theta = [], [], []
    for t in range(len(time_values)):
        frequency = np.ones(vocab_size)
        counts = np.zeros((len(dataset), num_genes))
        for row, example in enumerate(dataset):
            np.add.at(frequency, example["target_input_ids"][t][:max_target_length], 1.0)
            counts[row, example["target_counts_indices"][t]] = example["target_counts_values"][t]
        log_frequency.append(np.log(frequency / frequency.sum()))
        mu, var = counts.mean(0), counts.var(0)
        mean.append(np.maximum(mu, 1e-8))
        theta.append(np.clip(mu**2 / np.maximum(var - mu, 1e-8), 1e-3, 1e4))
    return np.array(log_frequency), np.array(mean), np.array(theta)


def reference_scores(dataloader, time_values, tables):
    log_frequency, mean, theta = (torch.tensor(t) for t in tables)
    token_sum = cells_with_masks = count_sum = cells = 0.0
    for batch in dataloader:
        t = torch.tensor([time_values.index(v) for v in batch["decoder_time_values"].tolist()])
        labels = batch["labels"]
        masked = labels != -100
        log_p = torch.gather(log_frequency[t], 1, labels.clamp(min=0))
        per_cell = -(log_p * masked).sum(1) / masked.sum(1).clamp(min=1)
        token_sum += per_cell[masked.any(1)].sum().item()
        cells_with_masks += masked.any(1).sum().item()
        nll = -negative_binomial_log_prob(batch["target_counts"].double(), mean[t], theta[t]).mean(1)
        count_sum += nll.sum().item()
        cells += len(t)
    return {"token_loss": token_sum / cells_with_masks, "count_nll": count_sum / cells}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_shalek.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    start = time.perf_counter()
    vocab = DATA / "vocab"
    tokens = workdir / "tokens"
    tokenize_anndata(
        DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad",
        tokens,
        time_key="time",
        time_value_key="time_h",
        source="1h",
        gene_id_key="human_ensembl_id",
        n_hvg=1000,
        seed=0,
        overwrite=True,
        progress=False,
        dictionaries=[
            vocab / "perturbgen_token_dict_gftokens_gc95M.pkl",
            vocab / "perturbgen_gene_median_dict_gftokens_gc95M.pkl",
            vocab / "perturbgen_ensembl_mapping_dict_gc95M.pkl",
        ],
    )
    tokenize_seconds = time.perf_counter() - start
    max_target_length = 256
    argv = [
        "--data",
        str(tokens),
        "--out",
        str(workdir / "model"),
        "--preset",
        "small",
        "--max_steps",
        str(args.max_steps),
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "32",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "20",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(max(args.max_steps // 5, 1)),
        "--save_strategy",
        "no",
        "--logging_steps",
        "20",
        "--eval_fraction",
        "0.2",
        "--max_source_length",
        "512",
        "--max_target_length",
        str(max_target_length),
        "--seed",
        "0",
        "--use_cpu",
        "--report_to",
        "none",
        "--overwrite",
    ]
    trainer = train(*parse_arguments(argv))
    train_metrics = next(h for h in reversed(trainer.state.log_history) if "train_runtime" in h)
    evaluations = [h for h in trainer.state.log_history if "eval_token_loss" in h]
    description = json.loads((tokens / "perturbgen_data.json").read_text())
    tables = reference_tables(
        trainer.train_dataset,
        description["time_values"],
        trainer.model.config.decoder_vocab_size,
        trainer.model.config.num_target_genes,
        max_target_length,
    )
    references = reference_scores(trainer.get_eval_dataloader(), description["time_values"], tables)
    final = evaluations[-1]
    result = {
        "data": "Shalek 2014 BMDC LPS, source 1h -> 2h, 4h, 6h",
        "train_pairs": len(trainer.train_dataset),
        "validation_pairs": len(trainer.eval_dataset),
        "target_genes": trainer.model.config.num_target_genes,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "max_steps": args.max_steps,
        "wall_seconds_total": time.perf_counter() - start,
        "tokenize_seconds": tokenize_seconds,
        "train_runtime_seconds": train_metrics["train_runtime"],
        "train_steps_per_second": train_metrics["train_steps_per_second"],
        "validation_during_training": [
            {"step": h["step"], "token_loss": h["eval_token_loss"], "count_nll": h["eval_count_nll"]}
            for h in evaluations
        ],
        "model": {
            "token_loss": final["eval_token_loss"],
            "perplexity": final["eval_perplexity"],
            "count_nll": final["eval_count_nll"],
            "count_mse": final["eval_count_mse"],
        },
        "reference_gene_frequency_token_loss": references["token_loss"],
        "reference_per_gene_mean_count_nll": references["count_nll"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
