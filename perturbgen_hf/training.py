"""
Train PerturbGen with `transformers.Trainer` (`perturbgen-hf train`, `scripts/train.py`).

Trainer runs on Accelerate, so the same command trains on one CPU, one GPU, or many processes under
`torchrun --nproc_per_node N` / `accelerate launch --multi_gpu`. The data come from `perturbgen-hf tokenize`.
"""

import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from transformers import (
    EarlyStoppingCallback,
    HfArgumentParser,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .data.collator import DataCollatorForPerturbGen
from .data.tokenize_dataset import load_description
from .io_utils import check_model_location, model_load_errors, read_yaml_options
from .modeling import PerturbGenConfig, PerturbGenForConditionalGeneration
from .output_folder import check_output_folder, write_marker
from .settings import OBJECTIVES, PRESETS, TIME_SCALES, CpuTrainingSettings, DataArguments, ModelArguments
from .tokenization import PerturbGenTokenizer, log_normalize


logger = logging.getLogger(__name__)


def parse_arguments(argv=None):
    """`(ModelArguments, DataArguments, TrainingArguments)` from the command line and an optional YAML file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="perturbgen-hf train")
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = _option_value(argv, "--config")
    if config_path is not None:
        path = Path(config_path)
        values = read_yaml_options(path, "training config")
        known = {f for dc in (ModelArguments, DataArguments, TrainingArguments) for f in dc.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown option(s) in {path}: {unknown}.")
        parser.set_defaults(**values)
    out = _option_value(argv, "--out")
    if out is not None and "--output_dir" not in argv:
        argv += ["--output_dir", out]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    _validate(model_args, data_args)
    _validate_schedule(training_args)
    _check_output_folder(training_args, data_args)
    return model_args, data_args, training_args


def _check_output_folder(training_args, data_args):
    if training_args.resume_from_checkpoint:
        return
    check_output_folder(training_args.output_dir, data_args.overwrite, data_args.force_overwrite)


def _option_value(argv, name):
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _validate_schedule(training_args):
    """Options Trainer would take without complaint (or reject only after the output folder exists)."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be a positive number of steps (or -1 to train --num_train_epochs), got "
            f"{training_args.max_steps}."
        )
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs must be positive, got {training_args.num_train_epochs}.")
    if not training_args.learning_rate >= 0:
        raise ValueError(f"--learning_rate must be >= 0, got {training_args.learning_rate}.")
    if training_args.per_device_train_batch_size < 1:
        raise ValueError(
            f"--per_device_train_batch_size must be >= 1, got {training_args.per_device_train_batch_size}."
        )


def _validate(model_args, data_args):
    if data_args.data is None:
        raise ValueError("--data (the output folder of `perturbgen-hf tokenize`) is required.")
    if model_args.preset not in PRESETS:
        raise ValueError(f"Unknown --preset {model_args.preset!r}; choose one of {list(PRESETS)}.")
    if data_args.objective not in OBJECTIVES:
        raise ValueError(f"Unknown --objective {data_args.objective!r}; choose one of {list(OBJECTIVES)}.")
    if model_args.time_scale not in TIME_SCALES:
        raise ValueError(f"Unknown --time_scale {model_args.time_scale!r}; choose one of {list(TIME_SCALES)}.")
    if data_args.target_time_points not in ("random", "all"):
        raise ValueError(f"--target_time_points must be random or all, got {data_args.target_time_points!r}.")
    if not 0.0 <= data_args.eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction must be in [0, 1), got {data_args.eval_fraction}.")
    if model_args.geneformer and model_args.model:
        raise ValueError(
            "Give --geneformer (a new model around a Geneformer encoder) or --model (continue), not both."
        )
    if data_args.objective == "counts" and not model_args.model:
        raise ValueError("--objective counts trains the count head of an existing model: give --model.")


# -- data ------------------------------------------------------------------------------------------------------------


def time_point_split(description, heldout):
    """Positions (in the dataset's time-point columns) used for training, and the held-out one (or None)."""
    names = description["time_points"]
    if heldout is None:
        return list(range(len(names))), None
    if heldout not in names:
        raise ValueError(f"--heldout_time_point {heldout!r} is not a target time point of the data: {names}.")
    if len(names) == 1:
        raise ValueError("Holding out the only target time point leaves nothing to train on.")
    held = names.index(heldout)
    return [i for i in range(len(names)) if i != held], held


def split_by_source_cell(dataset, fraction, seed):
    """
    Hold out a fraction of the source cells of each group (`source_group`), with all their pairs. Target cells may
    also occur in training pairs (pairs were sampled before the split).
    """
    if fraction <= 0:
        return dataset, None
    cells = np.asarray(dataset["source_cell_id"])
    groups = np.asarray(dataset["source_group"])
    rng = np.random.default_rng(seed)
    held = set()
    for group in sorted(set(groups)):
        unique = np.unique(cells[groups == group])
        count = max(1, round(fraction * len(unique))) if len(unique) > 1 else 0
        held.update(rng.choice(unique, count, replace=False).tolist())
    is_held = np.isin(cells, list(held))
    if is_held.all() or not is_held.any():
        raise ValueError(f"--eval_fraction {fraction} leaves no training or no validation cells.")
    return dataset.select(np.flatnonzero(~is_held)), dataset.select(np.flatnonzero(is_held))


# -- model ------------------------------------------------------------------------------------------------------------


def mean_log_library_size(dataset, limit=2000):
    """Mean log library size of the first `limit` training targets (the library-size head's starting bias)."""
    libraries = [v for row in dataset.select(range(min(limit, len(dataset))))["target_library_size"] for v in row]
    return float(np.mean(np.log(np.maximum(libraries, 1.0))))


def build_model(model_args, data_args, tokenizer, description, train_dataset, train_positions):
    """A new model (preset or Geneformer encoder) or a saved one, checked against the tokenizer's vocabularies."""
    time_points = [description["time_points"][i] for i in train_positions]
    time_values = [description["time_values"][i] for i in train_positions]
    if model_args.model:
        check_model_location(model_args.model, needs_tokenizer=False)
        with model_load_errors(model_args.model):
            model = PerturbGenForConditionalGeneration.from_pretrained(model_args.model)
        missing = [t for t in time_points if t not in model.config.time_points]
        if missing:
            logger.warning(
                "The model was not trained on time point(s) %s; they are predicted from their values.", missing
            )
    else:
        overrides = {
            **PRESETS[model_args.preset]["decoder"],
            "target_genes": tokenizer.target_genes,
            "condition_tokens": tokenizer.condition_tokens,
            "time_points": time_points,
            "time_values": time_values,
            "source_time_point": description["source"],
            "time_embedding_scale": time_embedding_scale(
                description["time_values"], description.get("source_time_value"), model_args.time_scale
            ),
            "decoder_max_position_embeddings": (data_args.max_target_length or tokenizer.num_target_genes)
            + len(description.get("condition_keys", [])),
            "freeze_encoder": model_args.freeze_encoder,
            "count_likelihood": model_args.count_likelihood,
            "library_size_source": model_args.library_size_source,
            "context_mode": model_args.context_mode,
            "source_path": model_args.source_path,
            "source_path_injection": model_args.source_path_injection,
            "source_path_map": model_args.source_path_map,
            "count_head_reads_source": model_args.count_head_reads_source,
            "count_readout": model_args.count_readout,
            "mask_schedule": model_args.mask_schedule,
            "log_library_size_init": mean_log_library_size(train_dataset),
        }
        if model_args.geneformer:
            model = PerturbGenForConditionalGeneration.from_geneformer(model_args.geneformer, **overrides)
        else:
            encoder = {
                **PRESETS[model_args.preset]["encoder"],
                "vocab_size": tokenizer.vocab_size,
                "max_position_embeddings": max(description["max_length"], data_args.max_source_length or 0),
                "pad_token_id": 0,
            }
            model = PerturbGenForConditionalGeneration(PerturbGenConfig(encoder=encoder, **overrides))
    tokenizer.check_model_compatibility(model)
    # Recorded so that perturbation truncates source cells as training did.
    model.config.max_source_length = min(
        data_args.max_source_length or model.config.encoder.max_position_embeddings,
        model.config.encoder.max_position_embeddings,
    )
    apply_objective(model, data_args)
    return model


def time_embedding_scale(target_values, source_value=None, mode: str = "gap") -> float:
    """
    The factor time values are multiplied by before the time embedding's sinusoids (`time_embedding_scale`):
    `"gap"` makes the smallest gap between the trained target time points 1 (they sit a few sinusoid units apart),
    `"span"` makes the whole course, source to last target, 1 (every sinusoid turns by at most a radian across it,
    so the embedding changes smoothly and almost linearly in time). 1 where there is no gap or span.
    """
    if mode not in TIME_SCALES:
        raise ValueError(f"Unknown time_scale {mode!r}; choose one of {list(TIME_SCALES)}.")
    targets = np.unique(np.asarray(target_values, dtype=np.float64))
    if mode == "gap":
        width = np.diff(targets).min() if len(targets) > 1 else 0.0
    else:
        course = np.unique(np.append(targets, [] if source_value is None else [float(source_value)]))
        width = course[-1] - course[0] if len(course) > 1 else 0.0
    return float(1.0 / width) if width > 0 else 1.0


def apply_objective(model, data_args):
    """Loss weights and frozen parts for the objective (the encoder stays as configured)."""
    config = model.config
    if data_args.objective == "tokens":
        config.token_loss_weight, config.count_loss_weight = 1.0, 0.0
    elif data_args.objective == "counts":
        config.token_loss_weight, config.count_loss_weight = 0.0, 1.0
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("count_head.")
    else:
        config.token_loss_weight, config.count_loss_weight = 1.0, data_args.count_loss_weight


def build_collators(model, data_args, description, train_positions, heldout_position):
    """The training and validation collators of `model` for the tokenized data."""
    config = model.config
    common = {
        "num_target_genes": config.num_target_genes,
        "context_mode": config.context_mode,
        "mask_schedule": config.mask_schedule,
        "mask_schedule_exponent": config.mask_schedule_exponent,
        "max_source_length": data_args.max_source_length,
        "max_target_length": data_args.max_target_length,
        "include_counts": data_args.objective != "tokens",
    }
    values = description["time_values"]
    train = DataCollatorForPerturbGen(
        time_values=[values[i] for i in train_positions],
        time_indices=train_positions,
        target_time_points=data_args.target_time_points,
        mask=data_args.objective != "counts",
        **common,
    )
    if heldout_position is None:
        # A collator of its own, always at epoch 0: validation masks stay the same from one evaluation to the next.
        evaluation = DataCollatorForPerturbGen(
            time_values=[values[i] for i in train_positions],
            time_indices=train_positions,
            mask=data_args.objective != "counts",
            **common,
        )
    else:
        positions = [*train_positions, heldout_position]
        evaluation = DataCollatorForPerturbGen(
            time_values=[values[i] for i in positions],
            time_indices=positions,
            target_index=len(positions) - 1,
            mask=data_args.objective != "counts",
            **common,
        )
    return train, evaluation


# -- trainer ----------------------------------------------------------------------------------------------------------


class EpochSeedCallback(TrainerCallback):
    """Tells the training collator the epoch, which its per-example random draws depend on."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Tell the collator which epoch starts (it reseeds its masking from it)."""
        self.collator.epoch = int(state.epoch or 0)


class LogLinesCallback(TrainerCallback):
    """
    Trainer's logs as one readable logging line each (`step 100/1600: loss 7.93, learning_rate 0.00099, ...`),
    instead of the Python dicts that Trainer's own printer and progress bar write to stdout.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Log Trainer's log event as one line (on the main process)."""
        if not state.is_world_process_zero or not logs:
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos"
        )
        logger.info("step %d/%d: %s", state.global_step, state.max_steps, shown)


class _ProgressBarOnly(ProgressCallback):
    """Trainer's progress bar without the log dicts it writes under the bar (see [`LogLinesCallback`])."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Write nothing: `LogLinesCallback` logs the event."""
        return


def _use_log_lines(trainer):
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.remove_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(_ProgressBarOnly)
    trainer.add_callback(LogLinesCallback)


class PerturbGenTrainer(Trainer):
    """
    `Trainer` whose evaluation reports the token loss, perplexity, count negative log-likelihood and the mean squared
    error of the predicted counts (each batch returns its sums; `compute_validation_metrics` pools them).
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation step: the loss and the summed token and count statistics of the batch."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            outputs = model(**inputs)
        cells = inputs["input_ids"].shape[0]
        sums = torch.zeros(1, 5, device=inputs["input_ids"].device)
        sums[0, 0] = cells
        if outputs.token_loss is not None:
            with_masks = (inputs["labels"] != -100).any(dim=1).sum()
            sums[0, 1], sums[0, 2] = outputs.token_loss * with_masks, with_masks
        if outputs.count_loss is not None:
            expected = outputs.count_mu
            if outputs.count_zi_logits is not None:
                expected = expected * torch.sigmoid(-outputs.count_zi_logits)
            sums[0, 3] = outputs.count_loss * cells
            sums[0, 4] = ((expected - inputs["target_counts"]) ** 2).mean(dim=1).sum()
        loss = outputs.loss.detach() if outputs.loss is not None else None
        # Trainer calls compute_metrics only when "labels" come back too; the sums carry everything needed.
        return loss, sums, torch.zeros_like(sums[:, :1])


def compute_validation_metrics(prediction):
    """Validation metrics from the summed statistics of every batch."""
    sums = np.asarray(prediction.predictions).reshape(-1, 5).sum(axis=0)
    metrics = {}
    if sums[2] > 0:
        metrics["token_loss"] = float(sums[1] / sums[2])
        metrics["perplexity"] = float(math.exp(min(metrics["token_loss"], 50.0)))
    if sums[3] != 0:
        metrics["count_nll"] = float(sums[3] / sums[0])
        metrics["count_mse"] = float(sums[4] / sums[0])
    return metrics


def train(model_args, data_args, training_args):
    """Train and save; returns the trainer (its `state` holds the logs)."""
    description = load_description(data_args.data)
    tokenizer = PerturbGenTokenizer.from_pretrained(Path(data_args.data) / "tokenizer")
    dataset = load_from_disk(str(Path(data_args.data) / "dataset"))
    train_positions, heldout_position = time_point_split(description, data_args.heldout_time_point)
    # Row ids seed each example's draws (see DataCollatorForPerturbGen), which makes resumed runs exact.
    dataset = dataset.add_column("example_id", list(range(len(dataset))))
    train_dataset, eval_dataset = split_by_source_cell(dataset, data_args.eval_fraction, training_args.seed)
    if heldout_position is not None and eval_dataset is None:
        eval_dataset = dataset  # the held-out time point is never trained on: all its cells validate
    # Trainer seeds only once it is built; the new model's initial weights must come from the seed too.
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, tokenizer, description, train_dataset, train_positions)
    train_collator, eval_collator = build_collators(model, data_args, description, train_positions, heldout_position)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once, with a model card, at the end
    training_args.remove_unused_columns = False  # the collator reads the raw columns
    if training_args.device.type == "cpu":
        # Pinned memory only speeds up copies to an accelerator; on a CPU torch warns at every dataloader.
        training_args.dataloader_pin_memory = False
    training_args.label_names = ["labels", "target_counts"]
    train_collator.seed = eval_collator.seed = training_args.seed
    callbacks = [EpochSeedCallback(train_collator)]
    if data_args.early_stopping_patience:
        configure_early_stopping(training_args, eval_dataset)
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    trainer = PerturbGenTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        processing_class=tokenizer,
        compute_metrics=compute_validation_metrics,
        callbacks=callbacks,
    )
    trainer.get_eval_dataloader = _with_collator(trainer.get_eval_dataloader, eval_collator)
    _use_log_lines(trainer)
    if trainer.is_world_process_zero():
        # Checkpoints are written here as training goes (for --resume_from_checkpoint); the marker says whose
        # folder it is, so that --overwrite may later replace it.
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        write_marker(training_args.output_dir, "train")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    sensitivity = source_sensitivity(
        trainer.model,
        eval_dataset if eval_dataset is not None else train_dataset,
        description,
        train_positions,
        data_args,
        training_args.seed,
    )
    logger.info(
        "Source sensitivity (mean |change| of predicted log1p CP10k per gene when the source is swapped for "
        "another cell; observed: the same for the observed targets): %s",
        json.dumps(sensitivity),
    )
    save_model(trainer, tokenizer, description, model_args, data_args, training_args, metrics, sensitivity)
    if push and trainer.is_world_process_zero():
        push_to_hub(
            training_args.output_dir,
            training_args.hub_model_id,
            training_args.hub_token,
            training_args.hub_private_repo,
        )
    return trainer


@torch.no_grad()
def source_sensitivity(model, dataset, description, positions, data_args, seed, max_cells=64) -> dict:
    """
    Does the model read its source? For up to `max_cells` examples, swap each source for another source cell (of the
    same `source_group`, and of any group) and measure how much the predicted target changes: the mean absolute
    difference per gene of predicted log1p CP10k (greedy generation, so only the source differs), per time point.
    The same figure for the observed targets paired with the two sources is the reference: a model that ignores its
    source scores 0; observed differences also hold the cells' sampling noise, so a good model scores below them.

    Returns:
        `dict`: `{"within_group" | "any_group": {time point: {"predicted": float, "observed": float}}}`, or `{}`
        when there are fewer than two source cells.
    """
    if dataset is None or len(dataset) < 2:
        return {}
    rng = np.random.default_rng(seed)
    rows = dataset.select(np.sort(rng.choice(len(dataset), min(max_cells, len(dataset)), replace=False)))
    groups = np.asarray(rows["source_group"]).astype(str)
    cells = np.asarray(rows["source_cell_id"]).astype(str)
    partners = {"within_group": [], "any_group": []}
    for i in range(len(rows)):
        same = np.flatnonzero((groups == groups[i]) & (cells != cells[i]))
        other = np.flatnonzero(cells != cells[i])
        partners["within_group"].append(int(rng.choice(same)) if len(same) else -1)
        partners["any_group"].append(int(rng.choice(other)) if len(other) else -1)
    # The training collator's own source truncation and dense target counts, one trained time point at a time.
    values = [description["time_values"][p] for p in positions]
    examples = list(rows)
    observed = []
    for k in range(len(positions)):
        collator = DataCollatorForPerturbGen(
            time_values=values,
            time_indices=positions,
            num_target_genes=model.config.num_target_genes,
            context_mode="none",
            target_index=k,
            mask=False,
            max_source_length=data_args.max_source_length,
        )
        batch = collator(examples)
        observed.append(log_normalize(batch["target_counts"].double().numpy()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # A model scaled by an observed library size gets a constant one: the figures are per 10,000 counts anyway.
    library = (
        torch.full((len(examples),), 1e4, device=device) if model.config.library_size_source == "observed" else None
    )
    out = model.generate(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        time_points=values,
        num_iterations=8,
        temperature=0.0,
        library_size=library,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    model.train(was_training)
    predicted = [log_normalize(out.counts[:, t].double().cpu().numpy()) for t in range(len(positions))]
    names = [description["time_points"][p] for p in positions]
    report = {}
    for kind, partner in partners.items():
        partner = np.asarray(partner)
        keep = partner >= 0
        if not keep.any():
            continue
        report[kind] = {
            name: {
                "predicted": float(np.abs(pred[keep] - pred[partner[keep]]).mean()),
                "observed": float(np.abs(obs[keep] - obs[partner[keep]]).mean()),
            }
            for name, pred, obs in zip(names, predicted, observed)
        }
    return report


def configure_early_stopping(training_args, eval_dataset):
    """Early stopping keeps the best checkpoint by a validation metric (`eval_loss` unless another is named)."""
    if eval_dataset is None:
        raise ValueError(
            "--early_stopping_patience needs validation data (--eval_fraction > 0 or --heldout_time_point)."
        )
    if str(training_args.eval_strategy) in ("no", "IntervalStrategy.NO"):
        raise ValueError(
            "--early_stopping_patience needs --eval_strategy steps or epoch (and the same --save_strategy)."
        )
    training_args.load_best_model_at_end = True
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "eval_loss"
    metric = training_args.metric_for_best_model
    training_args.greater_is_better = not any(word in metric for word in ("loss", "nll", "perplexity", "mse"))


def _with_collator(get_dataloader, collator):
    def patched(eval_dataset=None):
        dataloader = get_dataloader(eval_dataset)
        dataloader.collate_fn = collator
        return dataloader

    return patched


def save_model(trainer, tokenizer, description, model_args, data_args, training_args, metrics, sensitivity=None):
    """Save the model, tokenizer and `training_summary.json` (on the main process)."""
    trainer.save_model(training_args.output_dir)  # model (safetensors + code) and tokenizer
    if not trainer.is_world_process_zero():
        return
    out = Path(training_args.output_dir)
    (out / "training_summary.json").write_text(
        json.dumps(
            {
                "model_arguments": asdict(model_args),
                "data_arguments": asdict(data_args),
                "final_metrics": metrics,
                "source_sensitivity": sensitivity,
                "data": description,
            },
            indent=2,
            default=str,
        )
    )
    (out / "README.md").write_text(
        model_card(trainer.model.config, description, model_args, data_args, training_args, metrics)
    )


def model_card(config, description, model_args, data_args, training_args, metrics) -> str:
    """A Hugging Face model card (README.md with YAML metadata) describing data, training and results."""
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    time_points = ", ".join(f"{n} ({v:g})" for n, v in zip(config.time_points, config.time_values))
    source = description.get("input", {})
    return f"""---
library_name: transformers
tags:
- perturbgen
- single-cell
- perturbation
- trust-remote-code
pipeline_tag: other
---

# PerturbGen model

A [perturbgen-hf](https://github.com/) model: from a source cell state (`{description["source"]}`) it generates the cell
states at later time points and their expression counts, and predicts how an in silico gene perturbation of the
source changes them. Load it with `import perturbgen_hf; AutoModel.from_pretrained(...)`, or without the package
with `trust_remote_code=True`.

## Data

- input: `{source.get("path")}` (sha256 `{source.get("sha256")}`), {source.get("cells")} cells x {source.get("genes")} genes
- source time point: `{description["source"]}`; target time points: {time_points}
- held-out time point: {data_args.heldout_time_point or "none"}
- {config.num_target_genes} target genes; {len(config.condition_tokens)} condition tokens
- pairing: {description["pairing"]["mode"]} (key {description["pairing"]["key"]}, seed {description["pairing"]["seed"]}), {description["pairing"]["num_pairs"]} pairs

## Training

- objective: {data_args.objective}; count likelihood {config.count_likelihood}; library size {config.library_size_source}
- encoder: {"Geneformer " + str(model_args.geneformer) if model_args.geneformer else "preset " + model_args.preset}, frozen: {config.freeze_encoder}
- decoder: {config.decoder_num_layers} layers, hidden {config.decoder_hidden_size}, {config.decoder_num_heads} heads; context {config.context_mode}
- steps: {training_args.max_steps if training_args.max_steps > 0 else str(training_args.num_train_epochs) + " epochs"}; batch {training_args.per_device_train_batch_size} per device; learning rate {training_args.learning_rate}; seed {training_args.seed}

## Validation metrics (final)

| metric | value |
|---|---|
{metric_lines or "| (no validation split) | |"}

## Intended use and limits

For research: predicting trajectories and in silico perturbation effects in the kind of cells it was trained on.
Predictions are model outputs, not measurements; compare them with the package's baselines (no change, training
mean, linear model) before trusting them. Time points far outside the trained range are extrapolations. Cells
from other tissues, species or technologies than the training data are out of distribution.
"""


def cpu_training_arguments(data, out, settings: CpuTrainingSettings, log_every: int, progress: bool = False):
    """
    The `(ModelArguments, DataArguments, TrainingArguments)` of [`train_on_cpu`], built directly and checked as the
    command line's are: a model from scratch, no validation split, no checkpoints, 10% warm-up, no online logging.
    """
    model_args = ModelArguments(
        preset=settings.preset,
        freeze_encoder=settings.freeze_encoder,
        context_mode=settings.context_mode,
        source_path=settings.source_path,
        source_path_injection=settings.source_path_injection,
        source_path_map=settings.source_path_map,
        count_head_reads_source=settings.count_head_reads_source,
        count_readout=settings.count_readout,
        time_scale=settings.time_scale,
    )
    data_args = DataArguments(
        data=str(data),
        out=str(out),
        max_source_length=settings.max_source_length,
        max_target_length=settings.max_target_length,
        eval_fraction=0.0,
    )
    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=max(1, settings.max_steps // 10),
        use_cpu=True,
        report_to="none",
        seed=settings.seed,
        logging_steps=log_every,
        save_strategy="no",
        disable_tqdm=not progress,
    )
    _validate(model_args, data_args)
    _validate_schedule(training_args)
    _check_output_folder(training_args, data_args)
    return model_args, data_args, training_args


def train_on_cpu(data, out, settings: CpuTrainingSettings, log_every: int, progress: bool = False):
    """
    Train a model from scratch on a tokenized folder with the command's own code path, on the CPU, without
    validation or checkpoints: the demo's and `evaluate`'s training.

    Args:
        data, out (`str` or `os.PathLike`): the tokenized folder and the model folder.
        settings ([`CpuTrainingSettings`]): sizes and seed.
        log_every (`int`): logging interval in steps. progress (`bool`): show Trainer's progress bar.

    Returns:
        `list[dict]`: the logged training losses (`step`, `loss`, ...).
    """
    trainer = train(*cpu_training_arguments(data, out, settings, log_every, progress))
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def push_to_hub(folder, repo_id, token=None, private=None):
    """Upload a saved model folder (config, safetensors, code, tokenizer, model card) to the Hub."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. my-org/perturbgen-lps).")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    skipped = ["checkpoint-*", "checkpoint-*/**", "runs/**", "training_args.bin"]
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), ignore_patterns=skipped, commit_message="Upload PerturbGen model"
    )


def main(argv=None) -> int:
    """Run `perturbgen-hf train` with `argv`; returns the exit code."""
    model_args, data_args, training_args = parse_arguments(argv)
    try:
        train(model_args, data_args, training_args)
    finally:
        # Under torchrun, a process group left open at exit can abort a gloo process ("terminate called without an
        # active exception"), failing a run that finished.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
