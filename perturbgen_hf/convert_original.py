"""
Convert the original PerturbGen's checkpoints (PyTorch Lightning `.ckpt` files of Lotfollahi-lab/Perturbgen) into a
folder that `AutoModel`, `AutoTokenizer` and `pipeline("perturbation")` load.

- Stage 1 (`PerturbGenTrainer`, keys `transformer.*`, the frozen encoder nested under
  `transformer.encoder_layers.model.*`) and stage 2 (`CountDecoderTrainer`: `pretrained_model.*`, the count head
  `decoder.count_decoder.*`, the dispersion `theta`, and a duplicate `decoder.pretrained_model.*` that is ignored)
  are read; the standalone encoder checkpoint (`CellGenTrainer`) may be given as well, to supply or check the
  encoder.
- The configuration is the original architecture's model type (`perturbgen_original`, [`PerturbGenOriginalConfig`]): the original
  encoder (only its last block effective, as the original computes), post-norm decoder blocks with attention width
  heads x head dim, the ordinal time encoding with the original's offsets, interleaved sinusoids (recomputed; the
  stored buffers are dropped), the original pooling, the L2-normalised count head with one dispersion per batch
  condition and the observed library size, and the original's MaskGIT generation.
- Checkpoints are read with `torch.load(weights_only=True)`. Stage-2 files pickle the training AnnData objects in
  their hyper-parameters; those (and any other object of anndata, pandas, scipy, scanpy, pathlib or Lightning) are
  replaced by inert placeholders through an explicit allow-list, so nothing of theirs is built or run. Any other
  global (a function that would run code) is refused, naming it.
- Every key that is neither mapped nor deliberately dropped, every missing weight and every shape mismatch is an
  error that names it.
"""

import hashlib
import json
import logging
import math
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .modeling import PerturbGenOriginalConfig, PerturbGenOriginalForConditionalGeneration
from .output_folder import check_output_folder, staged_output_folder
from .tokenization import PerturbGenTokenizer
from .tokenization.safe_pickle import load_dictionary_pickle


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
# Libraries whose objects a Lightning checkpoint may pickle in its hyper-parameters (the training AnnData and what it
# holds, paths, Lightning's own containers): read as inert placeholders, never built.
PLACEHOLDER_LIBRARIES = (
    "anndata",
    "pandas",
    "scipy",
    "scanpy",
    "pathlib",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
)
# numpy globals that rebuild plain arrays and dtypes (numpy 2 writes `numpy._core`, numpy 1 `numpy.core`).
NUMPY_GLOBALS = {
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    "numpy._core.multiarray._reconstruct": np._core.multiarray._reconstruct,
    "numpy.core.multiarray._reconstruct": np._core.multiarray._reconstruct,
    "numpy._core.multiarray.scalar": np._core.multiarray.scalar,
    "numpy.core.multiarray.scalar": np._core.multiarray.scalar,
}


class UnsafeCheckpointError(ValueError):
    """The checkpoint refers to a function or class outside the allow-list: loading it could run code."""


# -- safe loading -------------------------------------------------------------------------------------------------------


class InertObject(dict):
    """
    Stands for an object that a checkpoint pickled from another library (an AnnData, a DataFrame, a path...): it
    accepts whatever the pickle gives it and keeps none of it, so no code of that library runs.
    """

    def __new__(cls, *args, **kwargs):
        """Create the placeholder object (its state is set by unpickling)."""
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<{self._pickled_name} (not loaded)>"


def _placeholder(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"_pickled_name": name})


def _numpy_dtype_classes() -> list:
    # Not reported by torch's scan of unsafe globals, but a pickled dtype refers to its class.
    import numpy.dtypes

    return [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType")]


def load_checkpoint(path) -> dict:
    """
    Read a Lightning checkpoint without executing anything it contains.

    Args:
        path (`str` or `os.PathLike`): the `.ckpt` file.

    Returns:
        `dict`: the checkpoint (`state_dict`, `hyper_parameters`, ...), with objects of other libraries replaced by
        [`InertObject`] placeholders.

    Raises:
        `FileNotFoundError`; [`UnsafeCheckpointError`] naming any global outside the allow-list; `ValueError` for a
        file that is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {str(path)!r}")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
    allowed, refused = [], []
    for name in unsafe:
        if name in NUMPY_GLOBALS:
            allowed.append(NUMPY_GLOBALS[name])
        elif name.split(".", 1)[0] in PLACEHOLDER_LIBRARIES:
            allowed.append((_placeholder(name), name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it refers to {sorted(refused)}, which could run code. Only tensors, plain "
            f"containers, numpy arrays and (as inert placeholders) objects of {list(PLACEHOLDER_LIBRARIES)} are read."
        )
    if np.dtype in allowed:
        allowed += _numpy_dtype_classes()
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: refusing to load: {error}") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'.")
    return checkpoint


# -- state dict -----------------------------------------------------------------------------------------------------------

# Suffixes of the original modules -> this package's names (blocks of the encoder and decoder alike).
_BLOCK_PARTS = {
    "norm1": "self_attn_norm",
    "norm2": "cross_attn_norm",
    "norm3": "mlp_norm",
    "self_attn.to_q": "self_attn.q_proj",
    "self_attn.to_k": "self_attn.k_proj",
    "self_attn.to_v": "self_attn.v_proj",
    "self_attn.to_out.0": "self_attn.o_proj",
    "cross_attn.to_q": "cross_attn.q_proj",
    "cross_attn.to_k": "cross_attn.k_proj",
    "cross_attn.to_v": "cross_attn.v_proj",
    "cross_attn.to_out.0": "cross_attn.o_proj",
    "feed_forward.fc1": "mlp.fc1",
    "feed_forward.fc2": "mlp.fc2",
}
_COUNT_HEAD = {
    "mlp.fc1": "count_head.mlp.0",
    "mlp.fc2": "count_head.mlp.2",
    "softmax_output.0": "count_head.proportion_logits",
    "linear_output": "count_head.zi_logits",
}
_BUFFERS = ("pos_embedding.pe", "pos_embedding.time_pe", "pos_embedding.pos_pe")
_BLOCK = re.compile(r"^decoder_block\.(\d+)\.(.+)\.(weight|bias)$")


def _module_key(key: str, prefix: str) -> str | None:
    """This package's name of an original module weight (`key` without the module's prefix), or None."""
    if key == "token_embedding.weight":
        return f"{prefix}.embed_tokens.weight"
    match = _BLOCK.match(key)
    if match and match.group(2) in _BLOCK_PARTS:
        return f"{prefix}.layers.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}.{match.group(3)}"
    return None


def map_state_dict(state_dict: dict, encoder_state_dict: dict | None = None) -> tuple[dict, dict]:
    """
    Map an original stage-1 or stage-2 state dict (and optionally the standalone encoder's) to this package's names.

    Returns:
        `(weights, report)`: the mapped tensors, and what was dropped or ignored (by key) and why.

    Raises:
        `ValueError` naming every key that is neither mapped nor deliberately dropped, and the encoder tensors on which
        the two checkpoints disagree.
    """
    weights, dropped, ignored, unexpected = {}, {}, [], []
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}  # torch.compile's infix
    stage = 2 if any(k.startswith("pretrained_model.") for k in state_dict) else 1
    decoder_prefix = "pretrained_model." if stage == 2 else "transformer."
    # The encoder's blocks are also called `decoder_block`; only the decoder's have cross-attention.
    if not any(k.startswith(decoder_prefix + "decoder_block.") and ".cross_attn." in k for k in state_dict):
        raise ValueError(
            "This is not a PerturbGen stage-1 or stage-2 checkpoint (no decoder blocks with cross-attention): a "
            "standalone encoder checkpoint goes to --encoder-checkpoint, beside the stage-1 or stage-2 one."
        )
    nested = decoder_prefix + "encoder_layers.model."
    encoder = {}
    for key, tensor in state_dict.items():
        if key.startswith("decoder.pretrained_model."):
            ignored.append(key)  # the same module registered twice in the count trainer
        elif key == "theta":
            weights["count_head.log_theta"] = tensor
        elif key.startswith("decoder.count_decoder."):
            name, _, kind = key[len("decoder.count_decoder.") :].rpartition(".")
            if name in _COUNT_HEAD:
                weights[f"{_COUNT_HEAD[name]}.{kind}"] = tensor
            else:
                unexpected.append(key)
        elif key.startswith(nested):
            encoder[key[len(nested) :]] = tensor
        elif key.startswith(decoder_prefix):
            inner = key[len(decoder_prefix) :]
            if inner in _BUFFERS:
                dropped[key] = "sinusoid buffer, recomputed"
            elif inner.startswith("decoder_fc."):
                weights["lm_head." + inner.split(".", 1)[1]] = tensor
            elif (name := _module_key(inner, "decoder")) is not None:
                weights[name] = tensor
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    if encoder_state_dict is not None:
        standalone = {
            k[len("transformer.") :]: v for k, v in encoder_state_dict.items() if k.startswith("transformer.")
        }
        unexpected += [f"(encoder) {k}" for k in encoder_state_dict if not k.startswith("transformer.")]
        differing = [k for k in set(encoder) & set(standalone) if not torch.equal(encoder[k], standalone[k])]
        if differing:
            raise ValueError(
                f"The encoder checkpoint disagrees with the encoder nested in the checkpoint on {sorted(differing)[:5]}; "
                "they must be the same model."
            )
        encoder = {**standalone, **encoder}
    for key, tensor in encoder.items():
        if key in _BUFFERS:
            dropped[f"encoder {key}"] = "sinusoid buffer, recomputed"
        elif key.startswith("decoder_fc."):
            dropped[f"encoder {key}"] = "the encoder's own output layer, unused by PerturbGen"
        elif (name := _module_key(key, "encoder")) is not None:
            weights[name] = tensor
        else:
            unexpected.append(f"encoder {key}")
    if unexpected:
        raise ValueError(f"Unexpected keys in the checkpoint (not part of PerturbGen as known): {unexpected}.")
    return weights, {"stage": stage, "dropped": dropped, "ignored_duplicates": len(ignored)}


# -- configuration ----------------------------------------------------------------------------------------------------


def _shape(weights, name):
    if name not in weights:
        raise ValueError(f"The checkpoint lacks {name!r} (after mapping); it cannot be converted.")
    return tuple(weights[name].shape)


def _num_blocks(weights, prefix):
    return 1 + max(int(k.split(".")[2]) for k in weights if k.startswith(f"{prefix}.layers."))


def build_config(weights, hparams, encoder_hparams, encoder_positions, target_genes, time_points, time_values):
    """
    A [`PerturbGenOriginalConfig`], from the hyper-parameters and the tensors' shapes.

    The original's encoder hyper-parameters are not stored in stage-1/2 checkpoints (its wrapper hard-codes
    them): the number of heads comes from the encoder checkpoint's hyper-parameters when given, else the
    production encoder's 8 heads are assumed.
    """
    if hparams.get("pos_encoding_mode", "time_pos_sin") != "time_pos_sin":
        raise ValueError(f"pos_encoding_mode {hparams['pos_encoding_mode']!r} is not supported (only time_pos_sin).")
    if hparams.get("condition_dict"):
        raise ValueError("Checkpoints with condition tokens (condition_dict) are not supported yet.")
    n_total_tps = int(hparams["n_total_tps"])
    if len(time_points) != n_total_tps:
        raise ValueError(f"--time-points names {len(time_points)} time points; the checkpoint has {n_total_tps}.")
    vocab_rows, width = _shape(weights, "encoder.embed_tokens.weight")
    encoder_inner = _shape(weights, "encoder.layers.0.self_attn.q_proj.weight")[0]
    encoder_heads = int((encoder_hparams or {}).get("num_heads", 8))
    if encoder_inner % encoder_heads:
        raise ValueError(f"The encoder's attention width {encoder_inner} is not divisible by {encoder_heads} heads.")
    decoder_vocab, decoder_width = _shape(weights, "decoder.embed_tokens.weight")
    heads, head_dim = int(hparams["num_heads"]), int(hparams["d_ff"])
    if _shape(weights, "decoder.layers.0.self_attn.q_proj.weight")[0] != heads * head_dim:
        raise ValueError(
            f"The decoder's attention width {_shape(weights, 'decoder.layers.0.self_attn.q_proj.weight')[0]} is not "
            f"num_heads x d_ff = {heads} x {head_dim}."
        )
    reserve = decoder_vocab - 4 - len(target_genes)
    if reserve < 0:
        raise ValueError(f"{len(target_genes)} target genes do not fit the decoder's {decoder_vocab} ids.")
    loss = hparams.get("loss_mode", "zinb")
    if loss not in ("zinb", "nb"):
        raise ValueError(f"Count loss {loss!r} is not supported (zinb or nb).")
    if hparams.get("use_size_factor", True) is False or hparams.get("use_observed_size_factor", True) is False:
        raise ValueError("Only count heads that use the observed library size (use_observed_size_factor) convert.")
    theta = weights.get("count_head.log_theta")
    return PerturbGenOriginalConfig(
        encoder={
            "vocab_size": vocab_rows,
            "hidden_size": width,
            "num_hidden_layers": _num_blocks(weights, "encoder"),
            "num_attention_heads": encoder_heads,
            "intermediate_size": _shape(weights, "encoder.layers.0.mlp.fc1.weight")[0],
            "max_position_embeddings": encoder_positions,
            "layer_norm_eps": 1e-5,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "pad_token_id": 0,
        },
        encoder_type="original",
        encoder_head_dim=encoder_inner // encoder_heads,
        encoder_chain_blocks=False,
        encoder_time_index=1,
        decoder_hidden_size=decoder_width,
        decoder_num_layers=_num_blocks(weights, "decoder"),
        decoder_num_heads=heads,
        decoder_head_dim=head_dim,
        decoder_intermediate_size=_shape(weights, "decoder.layers.0.mlp.fc1.weight")[0],
        decoder_norm="post",
        decoder_max_position_embeddings=int(hparams.get("max_seq_length", 2048)),
        layer_norm_eps=1e-5,
        time_points=list(time_points),
        time_values=list(time_values),
        time_encoding="ordinal",
        time_index_offset=1,
        sinusoid_layout="interleaved",
        context_mode="chained" if hparams.get("context_mode", True) else "none",
        target_genes=list(target_genes),
        decoder_vocab_reserve=reserve,
        pooling="non_special",
        count_likelihood=loss,
        library_size_source="observed",
        count_head_norm="l2",
        count_hidden_size=_shape(weights, "count_head.mlp.0.weight")[0]
        if "count_head.mlp.0.weight" in weights
        else decoder_width,
        num_dispersion_conditions=int(theta.shape[1]) if theta is not None and theta.dim() == 2 else 1,
        count_prediction="mu",
        mask_schedule=hparams.get("mask_scheduler", "cosine"),
        generation_mode="original",
        original_filter_threshold=0.9,
        freeze_encoder=True,
        source_path="none",
        count_readout="pooled",
    )


def _encoder_positions(state_dict, encoder_state_dict) -> int:
    """Length of the encoder's stored position table (the production encoder's 4,096 when absent)."""
    for key, tensor in state_dict.items():
        if key.replace("_orig_mod.", "").endswith("encoder_layers.model.pos_embedding.pos_pe"):
            return int(tensor.shape[1])
    if encoder_state_dict and "transformer.pos_embedding.pos_pe" in encoder_state_dict:
        return int(encoder_state_dict["transformer.pos_embedding.pos_pe"].shape[1])
    return 4096


# -- vocabularies -----------------------------------------------------------------------------------------------------


def build_tokenizer(token_dict, tokenid_to_rowid, rowid_to_gene, num_target_genes=None, gene_median_dict=None):
    """
    The tokenizer of a converted model: the original's source vocabulary (token ids unchanged) and its decoder
    genes (row id `4 + j` = target gene `j`), checked against each other.

    Returns:
        `(tokenizer, warnings)`.
    """
    tokens = load_dictionary_pickle(token_dict)
    to_row = load_dictionary_pickle(tokenid_to_rowid, key_type=int)
    row_names = load_dictionary_pickle(rowid_to_gene, key_type=int)
    for name, expected in SPECIAL_TOKENS.items():
        if tokens.get(name) != expected:
            raise ValueError(f"{token_dict}: {name} must be token {expected}, found {tokens.get(name)!r}.")
    genes = sorted((g for g in tokens if g not in SPECIAL_TOKENS), key=tokens.get)
    ids = [tokens[g] for g in genes]
    if ids != list(range(4, 4 + len(genes))):
        raise ValueError(f"{token_dict}: gene token ids must run 4, 5, ... without gaps (found {ids[:3]}...).")
    rows = sorted(r for r in row_names if r >= 4 and str(row_names[r]) not in SPECIAL_TOKENS)
    count = num_target_genes if num_target_genes is not None else len(rows)
    if rows[:count] != list(range(4, 4 + count)):
        raise ValueError(
            f"{rowid_to_gene}: target row ids must run 4, 5, ... for {count} genes (found {rows[:5]}...)."
        )
    targets = [str(row_names[r]) for r in range(4, 4 + count)]
    for row, gene in zip(range(4, 4 + count), targets):
        if gene not in tokens:
            raise ValueError(f"Target gene {gene!r} (row {row}) is not in the token dictionary {token_dict}.")
        if to_row.get(tokens[gene]) != row:
            raise ValueError(
                f"The vocabularies disagree: {gene!r} is token {tokens[gene]}, which {tokenid_to_rowid} maps to row "
                f"{to_row.get(tokens[gene])!r}, but {rowid_to_gene} puts it at row {row}."
            )
    warnings = []
    if gene_median_dict is not None:
        medians = load_dictionary_pickle(gene_median_dict)
        missing = [g for g in genes if g not in medians]
        if missing:
            raise ValueError(
                f"{gene_median_dict} has no median for {len(missing)} vocabulary genes (e.g. {missing[:3]})."
            )
        values = [medians[g] for g in genes]
    else:
        values = [1.0] * len(genes)
        warnings.append(
            "No --gene-median-dict: new cells are ranked by their counts without the original's per-gene median "
            "normalisation; give the median dictionary the original tokenized its data with."
        )
    tokenizer = PerturbGenTokenizer.from_vocabulary(genes, values)
    tokenizer.set_target_genes(targets)
    return tokenizer, warnings


# -- conversion -------------------------------------------------------------------------------------------------------


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_weights(model, weights):
    """Copy the mapped tensors into the model, naming every missing weight and shape mismatch."""
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in weights.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError(f"Shape mismatch: {mismatched}.")
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"Mapped weights the model does not have: {unknown}.")
    missing = sorted(set(expected) - set(weights))
    untrained = [k for k in missing if k.startswith("count_head.")]
    if set(missing) - set(untrained):
        raise ValueError(f"The checkpoint lacks these weights: {sorted(set(missing) - set(untrained))}.")
    model.load_state_dict(weights, strict=False)
    return untrained


def convert_original_checkpoint(
    checkpoint,
    token_dict,
    tokenid_to_rowid,
    rowid_to_gene,
    time_points,
    out,
    encoder_checkpoint=None,
    time_values=None,
    gene_median_dict=None,
    overwrite=False,
    force_overwrite=False,
) -> dict:
    """
    Convert an original PerturbGen checkpoint into a folder of this package (see the module docstring).

    Args:
        checkpoint (`str` or `os.PathLike`): stage-1 (`PerturbGenTrainer`) or stage-2 (`CountDecoderTrainer`) `.ckpt`.
        token_dict (`str` or `os.PathLike`): the encoder vocabulary pickle `{Ensembl ID: token id}`.
        tokenid_to_rowid (`str` or `os.PathLike`): the pickle `{source token id: decoder row id}`.
        rowid_to_gene (`str` or `os.PathLike`): the pickle `{decoder row id: gene}` (`mapping_dict_path`).
        time_points (`list[str]`): names of the original's time points 1, 2, ... (`pred_tps`), in order.
        out (`str` or `os.PathLike`): output folder (refused if not empty, unless `overwrite`).
        encoder_checkpoint (`str` or `os.PathLike`, *optional*): the standalone encoder `.ckpt`: supplies the encoder
            when the checkpoint lacks it, is checked against it otherwise, and gives the encoder's number of heads.
        time_values (`list[float]`, *optional*): numeric values of the time points (default 1, 2, ...); recorded,
            since the original's time encoding is ordinal.
        gene_median_dict (`str` or `os.PathLike`, *optional*): `{Ensembl ID: median}`, for ranking new cells as the
            original did.
        overwrite (`bool`), force_overwrite (`bool`): replace an earlier result, or any folder (see
            [`perturbgen_hf.output_folder.check_output_folder`]); the new one replaces it only once complete.

    Returns:
        `dict`: the conversion report, also written to `out/conversion_report.json`.
    """
    out = check_output_folder(out, overwrite, force_overwrite)
    time_points = [str(t) for t in time_points]
    time_values = [float(v) for v in time_values] if time_values else [float(i + 1) for i in range(len(time_points))]
    if len(time_values) != len(time_points):
        raise ValueError(f"{len(time_values)} --time-values for {len(time_points)} --time-points.")
    loaded = load_checkpoint(checkpoint)
    encoder_loaded = load_checkpoint(encoder_checkpoint) if encoder_checkpoint is not None else None
    encoder_state = encoder_loaded["state_dict"] if encoder_loaded else None
    weights, report = map_state_dict(loaded["state_dict"], encoder_state)
    hparams = loaded.get("hyper_parameters") or {}
    num_genes = int(hparams["n_genes"]) if report["stage"] == 2 and "n_genes" in hparams else None
    tokenizer, warnings = build_tokenizer(token_dict, tokenid_to_rowid, rowid_to_gene, num_genes, gene_median_dict)
    encoder_hparams = encoder_loaded.get("hyper_parameters") if encoder_loaded else None
    if encoder_hparams is None:
        warnings.append("No --encoder-checkpoint: the encoder's number of attention heads is assumed to be 8.")
    config = build_config(
        weights,
        hparams,
        encoder_hparams,
        _encoder_positions(loaded["state_dict"], encoder_state),
        tokenizer.target_genes,
        time_points,
        time_values,
    )
    model = PerturbGenOriginalForConditionalGeneration(config).eval()
    untrained = _load_weights(model, weights)
    if untrained:
        warnings.append(
            "A stage-1 checkpoint has no count head: its counts are untrained until a stage-2 (count) checkpoint is "
            "converted or the head is trained (`perturbgen-hf train --objective counts`)."
        )
    tokenizer.check_model_compatibility(model)
    report = {
        "source": {
            "checkpoint": str(checkpoint),
            "sha256": _sha256(checkpoint),
            "encoder_checkpoint": str(encoder_checkpoint) if encoder_checkpoint else None,
            "lightning_version": loaded.get("pytorch-lightning_version"),
        },
        "stage": report["stage"],
        "dropped_keys": report["dropped"],
        "ignored_duplicate_keys": report["ignored_duplicates"],
        "untrained_weights": untrained,
        "original_generation_defaults": {
            k: hparams.get(k) for k in ("temperature", "iterations", "sequence_length", "mask_scheduler")
        },
        "hyper_parameters": _jsonable(hparams),
        "warnings": warnings,
    }
    with staged_output_folder(out, "convert-original", overwrite, force_overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "conversion_report.json").write_text(json.dumps(report, indent=2))
    for warning in warnings:
        logger.warning(warning)
    return report


def _jsonable(value):
    """Hyper-parameters for the report: placeholders and other objects by their repr."""
    if isinstance(value, InertObject):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return repr(value)
