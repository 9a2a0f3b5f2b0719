"""
Parity of converted original PerturbGen checkpoints with the original code's outputs (the fixtures in
`../shared/data/fixtures/original_perturbgen/`, written by the original classes; see their README).
"""

import json
import os
import pickle

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, pipeline

from perturbgen_hf.cli import main
from perturbgen_hf.convert_original import UnsafeCheckpointError, load_checkpoint
from perturbgen_hf.modeling.likelihoods_perturbgen import (
    negative_binomial_log_prob,
    zero_inflated_negative_binomial_log_prob,
)
from perturbgen_hf.pipelines.perturbation_edits import original_perturb_sequence

from .conftest import SHARED_DATA


FIXTURES = SHARED_DATA / "fixtures" / "original_perturbgen"
TIMES = ["t1", "t2"]


def close(got, expected):
    """The fixture README's acceptance test for float tensors."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def io():
    return load_file(FIXTURES / "io.safetensors")


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    """The fixture's vocabularies as the original's pickles (`io.json` holds them as JSON)."""
    folder = tmp_path_factory.mktemp("vocab")
    vocab = json.loads((FIXTURES / "io.json").read_text())["vocab"]
    tokens = dict(vocab["special_tokens"])
    tokens.update({name: int(i) for i, name in vocab["src_vocab"]["gene_name_of_token_id"].items()})
    files = {
        "token_dict": tokens,
        "tokenid_to_rowid": {int(k): int(v) for k, v in vocab["src_token_id_to_tgt_row_id"].items()},
        "rowid_to_gene": {int(k): v for k, v in vocab["tgt_row_id_to_gene_name"].items()},
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pkl"
        paths[name].write_bytes(pickle.dumps(content))
    return paths


def convert_args(vocabulary, checkpoint, out, *extra):
    return [
        "convert-original",
        "--checkpoint",
        str(FIXTURES / checkpoint),
        "--encoder-checkpoint",
        str(FIXTURES / "encoder.ckpt"),
        "--token-dict",
        str(vocabulary["token_dict"]),
        "--tokenid-to-rowid",
        str(vocabulary["tokenid_to_rowid"]),
        "--rowid-to-gene",
        str(vocabulary["rowid_to_gene"]),
        "--time-points",
        *TIMES,
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def converted(vocabulary, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    assert main(convert_args(vocabulary, "count.ckpt", folder / "count")) == 0
    assert main(convert_args(vocabulary, "masking.ckpt", folder / "masking")) == 0
    return folder


@pytest.fixture(scope="module")
def count_model(converted):
    return AutoModel.from_pretrained(converted / "count").eval()


@pytest.fixture(scope="module")
def masking_model(converted):
    return AutoModel.from_pretrained(converted / "masking").eval()


def source(io):
    ids = io["input.src_input_ids"]
    return ids, (ids != 0).long()


def targets(io):
    return torch.stack([io["input.tgt_input_ids_t1"], io["input.tgt_input_ids_t2"]], dim=1)


def libraries(io):
    return torch.stack([io["input.tgt_size_factor_t1"], io["input.tgt_size_factor_t2"]], dim=1)


def teacher_forced(model, io, t, context=True, decoder_input_ids=None):
    """The original's teacher-forced forward of time point `t` (0 or 1), the other one as context."""
    ids, mask = source(io)
    tokens = targets(io)
    values = model.config.time_values
    other = 1 - t
    kwargs = {}
    if context:
        kwargs = {
            "context_input_ids": tokens[:, other : other + 1],
            "context_time_values": torch.full((3, 1), values[other]),
        }
    with torch.no_grad():
        return model(
            ids,
            mask,
            decoder_input_ids=tokens[:, t] if decoder_input_ids is None else decoder_input_ids,
            decoder_time_values=torch.full((3,), values[t]),
            library_size=libraries(io)[:, t],
            **kwargs,
        )


# -- conversion ---------------------------------------------------------------------------------------------------------


def test_conversion_report_and_auto_classes(converted, count_model):
    report = json.loads((converted / "count" / "conversion_report.json").read_text())
    assert report["stage"] == 2 and report["ignored_duplicate_keys"] == 91  # the duplicated decoder.pretrained_model
    assert report["untrained_weights"] == []
    assert "transformer.pos_embedding.pos_pe" not in report["dropped_keys"]  # stage 2 names it pretrained_model.*
    assert report["dropped_keys"]["pretrained_model.pos_embedding.time_pe"] == "sinusoid buffer, recomputed"
    adata = report["hyper_parameters"]["tgt_adata"]["tgt_h5ad_t1"]
    assert adata == "<anndata._core.anndata.AnnData (not loaded)>"  # recorded as an inert placeholder
    masking = json.loads((converted / "masking" / "conversion_report.json").read_text())
    assert masking["stage"] == 1 and "count_head.proportion_logits.weight" in masking["untrained_weights"]
    config = count_model.config
    assert (config.encoder_type, config.encoder_chain_blocks, config.generation_mode) == (
        "original",
        False,
        "original",
    )
    assert config.decoder_vocab_size == 40 and config.num_target_genes == 30 and config.decoder_vocab_reserve == 6
    assert config.encoder.num_hidden_layers == 3 and config.encoder_head_dim == 16 and config.decoder_head_dim == 8
    tokenizer = AutoTokenizer.from_pretrained(converted / "count")
    assert tokenizer.gene_to_id("ENSG90000000019") == 19  # the original's source token id
    assert tokenizer.target_gene_to_id("ENSG90000000019") == 11  # ... and its decoder row id


def test_the_original_architecture_is_its_own_model_type(converted, count_model, io, tmp_path):
    import shutil

    from perturbgen_hf import (
        PerturbGenConfig,
        PerturbGenForConditionalGeneration,
        PerturbGenOriginalConfig,
        PerturbGenOriginalForConditionalGeneration,
    )
    from perturbgen_hf.modeling.configuration_original_perturbgen import ORIGINAL_SWITCHES

    saved = json.loads((converted / "count" / "config.json").read_text())
    assert saved["model_type"] == "perturbgen_original" and saved["generation_mode"] == "original"
    assert type(count_model) is PerturbGenOriginalForConditionalGeneration
    assert type(count_model.config) is PerturbGenOriginalConfig
    # The package's own config has none of the original's switches, and refuses them with a pointer.
    assert not set(ORIGINAL_SWITCHES) & set(PerturbGenConfig().to_dict())
    with pytest.raises(ValueError, match="PerturbGenOriginalConfig"):
        PerturbGenConfig(encoder_type="original")
    with pytest.raises(ValueError, match="context_mode"):
        PerturbGenConfig(context_mode="chained")
    # A folder converted before the model type existed (saved as "perturbgen") migrates on load, unchanged.
    old = tmp_path / "converted_before"
    shutil.copytree(converted / "count", old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "perturbgen"
    config["auto_map"] = {  # as those folders recorded it
        "AutoConfig": "configuration_perturbgen.PerturbGenConfig",
        "AutoModel": "modeling_perturbgen.PerturbGenForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_perturbgen.PerturbGenForConditionalGeneration",
    }
    (old / "config.json").write_text(json.dumps(config))
    expected = teacher_forced(count_model, io, 1)
    for loader in (AutoModel, PerturbGenForConditionalGeneration):
        migrated = loader.from_pretrained(old).eval()
        assert type(migrated) is PerturbGenOriginalForConditionalGeneration
        out = teacher_forced(migrated, io, 1)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.count_mu, expected.count_mu)


def test_a_converted_folder_loads_as_remote_code_without_the_package(converted, tmp_path):
    import shutil
    import subprocess
    import sys
    import textwrap

    folder = tmp_path / "model"
    shutil.copytree(converted / "count", folder)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["perturbgen_hf"] = None  # the package must not be importable here
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "PerturbGenOriginalForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(torch.tensor([[2, 10, 11, 12, 3]]), sequence_length=4, library_size=torch.tensor([1e3]))
        assert out.sequences.shape == (1, 2, 4)
        print("REMOTE-OK")
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_the_converter_script_matches_the_command(vocabulary, tmp_path, count_model):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_original_checkpoint.py"
    args = convert_args(vocabulary, "count.ckpt", tmp_path / "script")[1:]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    again = AutoModel.from_pretrained(tmp_path / "script")
    for name, tensor in count_model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


# -- parity ---------------------------------------------------------------------------------------------------------------


def test_encoder_parity(count_model, masking_model, io):
    ids, mask = source(io)
    with torch.no_grad():
        close(count_model.encode(ids, mask), io["encoder.output"])  # every position, padding rows included
        close(masking_model.encode(ids, mask), io["encoder.output"])


@pytest.mark.parametrize("context", [True, False])
def test_teacher_forced_decoder_parity(count_model, io, context):
    prefix = "tf_ctx" if context else "tf_noctx"
    for t, name in enumerate(TIMES):
        out = teacher_forced(count_model, io, t, context)
        close(out.logits, io[f"{prefix}.logits_{name}"])
        close(out.decoder_last_hidden_state, io[f"{prefix}.hidden_{name}"])
        close(out.cell_embeddings, io[f"{prefix}.mean_embedding_{name}"])


def test_masked_forward_parity(masking_model, io):
    for t, name in enumerate(TIMES):
        masked = io[f"masked.input_ids_{name}"]
        out = teacher_forced(masking_model, io, t, decoder_input_ids=masked)
        close(out.logits, io[f"masked.logits_{name}"])
        close(out.decoder_last_hidden_state, io[f"masked.hidden_{name}"])
        close(out.cell_embeddings, io[f"masked.mean_embedding_{name}"])  # <mask> positions left out
        # the original's loss is a plain mean over masked positions (this package's token loss weighs cells equally)
        loss = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), io[f"masked.labels_{name}"])
        close(loss, io[f"masked.ce_loss_{name}"])


def test_count_head_and_likelihood_parity(count_model, io):
    head = count_model.count_head
    with torch.no_grad():
        alone = head(io["count.head_only.input"], library_size=torch.ones(4))
        close(alone["normalized_hidden"], io["count.head_only.normalized_hidden"])
        close(alone["mu"], io["count.head_only.count_mean"])  # library 1: the proportions
        close(alone["zi_logits"], io["count.head_only.zi_logits"])
        condition = io["input.combined_batch"]
        total = 0.0
        for t, name in enumerate(TIMES):
            out = teacher_forced(count_model, io, t)
            params = head(out.cell_embeddings, libraries(io)[:, t], dispersion_condition=condition)
            close(params["theta"], io["count.theta"])
            close(params["mu"] / libraries(io)[:, t, None], io[f"count.count_mean_{name}"])
            close(params["mu"], io[f"count.mu_{name}"])
            close(out.count_mu, io[f"count.mu_{name}"])
            close(params["zi_logits"], io[f"count.zi_logits_{name}"])
            counts = io[f"input.tgt_counts_{name}"]
            zinb = zero_inflated_negative_binomial_log_prob(counts, params["mu"], params["theta"], params["zi_logits"])
            close(zinb, io[f"count.zinb_logprob_{name}"])
            close(negative_binomial_log_prob(counts, params["mu"], params["theta"]), io[f"count.nb_logprob_{name}"])
            total = total - zinb.sum(dim=1).mean()
        close(total, io["count.loss"])
        with pytest.raises(ValueError, match="dispersion_condition"):
            head.loss(head(out.cell_embeddings, libraries(io)[:, 1]), io["input.tgt_counts_t2"])


GENERATIONS = {
    "cosine_T0": ("cosine", 0.0, None),
    "pow_T0": ("pow", 0.0, None),
    "cosine_T1_seed1234": ("cosine", 1.0, 1234),
}


def generate(model, io, schedule, temperature, seed):
    ids, mask = source(io)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        return model.generate(
            ids,
            mask,
            time_points=TIMES,
            sequence_length=12,
            num_iterations=6,
            temperature=temperature,
            schedule=schedule,
            reference_input_ids=targets(io),
            library_size=libraries(io),
            generator=generator,
        )


@pytest.mark.parametrize("tag", list(GENERATIONS))
def test_generation_parity(count_model, io, tag):
    out = generate(count_model, io, *GENERATIONS[tag])
    for t, name in enumerate(TIMES):
        assert torch.equal(out.sequences[:, t], io[f"gen.{tag}.ids_{name}"]), name  # exactly
        close(out.cell_embeddings[:, t], io[f"gen.{tag}.mean_embedding_{name}"])
        close(out.count_mu[:, t] / libraries(io)[:, t, None], io[f"gen.{tag}.count_mean_{name}"])
        close(out.count_mu[:, t], io[f"gen.{tag}.mu_{name}"])
        close(out.counts[:, t], io[f"gen.{tag}.mu_{name}"])  # a converted model reports mu, as the original


def test_generation_at_temperature_zero_ignores_the_seed(count_model, io):
    first = generate(count_model, io, "cosine", 0.0, 1).sequences
    assert torch.equal(first, generate(count_model, io, "cosine", 0.0, 99).sequences)


@pytest.mark.parametrize("mode", ["mask", "pad", "delete", "overexpress"])
def test_perturbation_edits_parity(io, mode):
    ids = io["input.src_input_ids"]
    assert torch.equal(original_perturb_sequence(ids, [19], mode, "src"), io[f"pert.edit.src_{mode}"])
    target = io["input.tgt_input_ids_t1"]
    assert torch.equal(original_perturb_sequence(target, [11], mode, "tgt"), io[f"pert.edit.tgt_t1_{mode}"])


@pytest.mark.parametrize("tag", ["infer_src_mask", "infer_tgt_overexpress"])
def test_inference_perturbation_parity(count_model, io, tag):
    prefix = f"pert.{tag}."
    ids, mask = source(io)
    edited_source = io[prefix + "src_input_ids"]
    edited = torch.stack([io[prefix + "tgt_input_ids_t1"], io[prefix + "tgt_input_ids_t2"]], dim=1)
    if tag == "infer_tgt_overexpress":
        assert torch.equal(edited[:, 0], original_perturb_sequence(targets(io)[:, 0], [11], "overexpress", "tgt"))
    exclude = [11] if tag == "infer_tgt_overexpress" else None  # the perturbed gene leaves the perturbed pooling
    with torch.no_grad():
        control = count_model.readout(ids, targets(io), TIMES, mask, library_size=libraries(io))
        perturbed = count_model.readout(
            edited_source,
            edited,
            TIMES,
            (edited_source != 0).long(),
            library_size=libraries(io),
            exclude_from_pooling=exclude,
        )
    for t, name in enumerate(TIMES):
        close(control.cell_embeddings[:, t], io[prefix + f"mean_embedding_ctrl_{name}"])
        close(perturbed.cell_embeddings[:, t], io[prefix + f"mean_embedding_pert_{name}"])
        cosine = torch.nn.functional.cosine_similarity(perturbed.cell_embeddings[:, t], control.cell_embeddings[:, t])
        close(cosine, io[prefix + f"mean_cos_{name}"])
        close(control.count_mu[:, t], io[prefix + f"mu_ctrl_{name}"])
        close(perturbed.count_mu[:, t], io[prefix + f"mu_pert_{name}"])


# -- deliberate corruptions make parity fail ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [{"time_index_offset": 0}, {"encoder_chain_blocks": True}, {"decoder_norm": "pre"}],
    ids=["wrong time offset", "chained encoder", "pre-norm decoder"],
)
def test_corruptions_break_parity(converted, io, override):
    corrupted = AutoModel.from_pretrained(converted / "count", **override).eval()
    with pytest.raises(AssertionError):
        test_teacher_forced_decoder_parity(corrupted, io, context=True)
    out = generate(corrupted, io, "cosine", 0.0, None)
    expected = torch.stack([io["gen.cosine_T0.ids_t1"], io["gen.cosine_T0.ids_t2"]], dim=1)
    assert not torch.equal(out.sequences, expected)


# -- the converted model in the pipeline ----------------------------------------------------------------------------------


def test_pipeline_runs_on_a_converted_model(converted):
    rng = np.random.default_rng(0)
    genes = [f"ENSG9{i:010d}" for i in range(4, 60)]
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=len(genes)), size=(12, len(genes))).astype(np.float32)
    counts[:, genes.index("ENSG90000000019")] = rng.integers(5, 20, size=12)  # every cell expresses the gene
    cells = ad.AnnData(counts)
    cells.var_names = genes
    pipe = pipeline("perturbation", model=str(converted / "count"))
    result = pipe(cells, genes=["ENSG90000000019"], mode="delete", iterations=4, seed=0, progress=False)
    assert result.summary["cells"] == 12 and set(result.adata.obs["time_point"]) == set(TIMES)
    assert np.isfinite(result.adata.layers["perturbed"]).all()
    again = pipe(cells, genes=["ENSG90000000019"], mode="delete", iterations=4, seed=0, progress=False)
    np.testing.assert_array_equal(result.adata.layers["perturbed"], again.adata.layers["perturbed"])


# -- safe loading and errors ---------------------------------------------------------------------------------------------


def test_stage_two_checkpoints_load_without_building_their_anndata():
    with pytest.raises(Exception, match=r"Unsupported global|weights_only"):
        torch.load(FIXTURES / "count.ckpt", weights_only=True)  # why a plain safe load is not enough
    checkpoint = load_checkpoint(FIXTURES / "count.ckpt")
    placeholder = checkpoint["hyper_parameters"]["tgt_adata"]["tgt_h5ad_t1"]
    assert type(placeholder).__name__ == "AnnData" and not hasattr(placeholder, "X")  # inert, nothing kept


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_checkpoint_is_refused(tmp_path, vocabulary):
    marker = tmp_path / "code_ran"
    tampered = load_checkpoint(FIXTURES / "masking.ckpt")
    tampered["hyper_parameters"]["payload"] = _RunsCode(marker)
    path = tmp_path / "tampered.ckpt"
    torch.save(tampered, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    code = main(
        [
            "convert-original",
            "--checkpoint",
            str(path),
            "--token-dict",
            str(vocabulary["token_dict"]),
            "--tokenid-to-rowid",
            str(vocabulary["tokenid_to_rowid"]),
            "--rowid-to-gene",
            str(vocabulary["rowid_to_gene"]),
            "--time-points",
            *TIMES,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1 and not marker.exists() and not (tmp_path / "out").exists()


def _modified_checkpoint(tmp_path, edit):
    checkpoint = load_checkpoint(FIXTURES / "masking.ckpt")
    edit(checkpoint["state_dict"])
    path = tmp_path / "modified.ckpt"
    torch.save({"state_dict": checkpoint["state_dict"], "hyper_parameters": checkpoint["hyper_parameters"]}, path)
    return path


def test_conversion_errors_name_the_problem(tmp_path, vocabulary, capsys):
    def run(checkpoint, *extra):
        args = convert_args(vocabulary, "masking.ckpt", tmp_path / "out", *extra)
        args[args.index("--checkpoint") + 1] = str(checkpoint)
        return main(args), capsys.readouterr().err

    extra_key = _modified_checkpoint(tmp_path, lambda sd: sd.__setitem__("transformer.extra.weight", torch.zeros(2)))
    code, err = run(extra_key)
    assert code == 1 and "transformer.extra.weight" in err

    def shrink(sd):
        sd["transformer.decoder_block.1.norm2.weight"] = torch.ones(31)

    code, err = run(_modified_checkpoint(tmp_path, shrink))
    assert code == 1 and "decoder.layers.1.cross_attn_norm.weight" in err and "(31,)" in err and "(32,)" in err

    code, err = run(_modified_checkpoint(tmp_path, lambda sd: sd.pop("transformer.decoder_fc.bias")))
    assert code == 1 and "lm_head.bias" in err

    code, err = run(FIXTURES / "encoder.ckpt")
    assert code == 1 and "--encoder-checkpoint" in err
    code, err = run(FIXTURES / "masking.ckpt", "--time-values", "1")
    assert code == 1 and "1 --time-values for 2 --time-points" in err
    code, err = run(tmp_path / "missing.ckpt")
    assert code == 1 and "not found" in err
    swapped = pickle.loads(vocabulary["rowid_to_gene"].read_bytes())
    swapped[4], swapped[5] = swapped[5], swapped[4]
    (tmp_path / "swapped.pkl").write_bytes(pickle.dumps(swapped))
    args = convert_args(vocabulary, "masking.ckpt", tmp_path / "out2")
    args[args.index("--rowid-to-gene") + 1] = str(tmp_path / "swapped.pkl")
    assert main(args) == 1 and "disagree" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_converted_model_fine_tunes(converted, tmp_path):
    import pandas as pd

    from perturbgen_hf.data import tokenize_anndata

    rng = np.random.default_rng(1)
    genes = [f"ENSG9{i:010d}" for i in range(4, 60)]
    cells = ad.AnnData(rng.poisson(rng.gamma(1.0, 3.0, size=len(genes)), size=(30, len(genes))).astype(np.float32))
    cells.var_names = genes
    cells.obs_names = [f"c{i}" for i in range(30)]
    cells.obs["time"] = pd.Categorical(np.repeat(["t0", "t1", "t2"], 10), ordered=True)
    # the model's own tokenizer: its vocabulary and decoder genes are kept, so the data fit the model
    tokenize_anndata(
        cells,
        tmp_path / "tokens",
        time_key="time",
        source="t0",
        tokenizer=converted / "count",
        max_length=64,
        progress=False,
    )
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "tokens"),
            "--model",
            str(converted / "count"),
            "--out",
            str(tmp_path / "tuned"),
            "--objective",
            "tokens",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--use_cpu",
            "--report_to",
            "none",
            "--eval_fraction",
            "0",
            "--max_source_length",
            "64",
            "--max_target_length",
            "20",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    tuned = AutoModel.from_pretrained(tmp_path / "tuned")
    original = AutoModel.from_pretrained(converted / "count")
    assert tuned.config.generation_mode == "original" and tuned.config.encoder_chain_blocks is False
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed and all(n.startswith(("decoder.", "lm_head.")) for n in changed)  # the encoder stays frozen
