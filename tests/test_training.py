import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from datasets import Dataset, load_from_disk
from hub_server import FakeHub
from safetensors.torch import load_file
from transformers import AutoModel, Trainer, TrainingArguments

from perturbgen_hf import PerturbGenForConditionalGeneration
from perturbgen_hf.cli import main as cli_main
from perturbgen_hf.data import DataCollatorForPerturbGen, tokenize_anndata
from perturbgen_hf.training import main as train_main


REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "tiny",
    "--max_source_length",
    "64",
    "--max_target_length",
    "32",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--learning_rate",
    "3e-3",
    "--logging_steps",
    "2",
    "--seed",
    "0",
    "--report_to",
    "none",
    "--use_cpu",
    "--dataloader_num_workers",
    "0",
]


@pytest.fixture(scope="module")
def lps_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("lps") / "tokens"
    tokenize_anndata(
        SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad",
        out,
        time_key="time",
        time_value_key="time_h",
        source="1h",
        gene_id_key="human_ensembl_id",
        n_hvg=60,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def trained(lps_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    code = cli_main(
        [
            "train",
            "--data",
            str(lps_data),
            "--out",
            str(out),
            *TINY,
            "--max_steps",
            "12",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "6",
            "--save_steps",
            "6",
            "--save_total_limit",
            "1",
        ]
    )
    assert code == 0
    return out


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_training_saves_a_loadable_model_with_card_and_metrics(trained, lps_data):
    files = {p.name for p in trained.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "tokenizer_config.json",
        "README.md",
        "modeling_perturbgen.py",
        "training_summary.json",
    } <= files
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-12"]  # save_total_limit
    model = AutoModel.from_pretrained(trained)
    assert type(model) is PerturbGenForConditionalGeneration
    assert model.config.time_points == ["2h", "4h", "6h"]
    summary = json.loads((trained / "training_summary.json").read_text())
    metrics = summary["final_metrics"]
    for key in ("eval_token_loss", "eval_perplexity", "eval_count_nll", "eval_count_mse"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    # The source-sensitivity diagnostic: per swap kind and trained time point, predicted and observed changes.
    sensitivity = summary["source_sensitivity"]
    assert set(sensitivity) == {"within_group", "any_group"}
    for kind in sensitivity.values():
        assert set(kind) == {"2h", "4h", "6h"}
        for figures in kind.values():
            assert figures["observed"] > 0 and figures["predicted"] >= 0
    history = json.loads((trained / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    card = (trained / "README.md").read_text()
    assert "Intended use and limits" in card and "eval_token_loss" in card and "2h (2)" in card


def test_resume_continues_bit_identically(lps_data, tmp_path):
    common = ["--data", str(lps_data), *TINY, "--max_steps", "8", "--save_steps", "4", "--eval_fraction", "0"]
    assert train_main([*common, "--out", str(tmp_path / "straight")]) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(tmp_path / "straight" / "checkpoint-4", resumed / "checkpoint-4")
    assert train_main([*common, "--out", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-4")]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_trains_the_same_model(lps_data, tmp_path):
    common = ["--data", str(lps_data), *TINY, "--max_steps", "3", "--save_strategy", "no", "--eval_fraction", "0"]
    assert train_main([*common, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*common, "--out", str(tmp_path / "b")]) == 0
    assert train_main([*common, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)  # initial weights included: the seed is set before the model
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_matches_a_larger_batch(lps_data, tmp_path):
    """Two accumulated micro-batches of 4 give the same step as one batch of 8 (fixed, pre-masked inputs)."""
    dataset = load_from_disk(str(lps_data / "dataset")).select(range(8))
    description = json.loads((lps_data / "perturbgen_data.json").read_text())
    collator = DataCollatorForPerturbGen(
        description["time_values"],
        num_target_genes=description["num_target_genes"],
        target_index=1,
        max_source_length=64,
        max_target_length=32,
        seed=0,
    )
    batch = collator([dataset[i] for i in range(8)])
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    stacked = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])

    def stack(examples):
        return {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}

    def one_step(batch_size, accumulation):
        torch.manual_seed(0)
        from conftest import tiny_config

        from perturbgen_hf.training import PRESETS

        config = tiny_config(
            num_target_genes=description["num_target_genes"],
            condition_tokens=[],
            time_points=description["time_points"],
            time_values=description["time_values"],
            encoder={**PRESETS["tiny"]["encoder"], "vocab_size": 18967, "max_position_embeddings": 64},
        )
        model = PerturbGenForConditionalGeneration(config)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            report_to="none",
            use_cpu=True,
            seed=0,
            remove_unused_columns=False,
            save_strategy="no",
            lr_scheduler_type="constant",
        )
        Trainer(model=model, args=args, train_dataset=stacked, data_collator=stack).train()
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    big, accumulated = one_step(8, 1), one_step(4, 2)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=2e-6, rtol=1e-5)


def test_two_stages_train_tokens_then_only_the_count_head(lps_data, trained, tmp_path):
    stage2 = tmp_path / "stage2"
    assert (
        train_main(
            [
                "--data",
                str(lps_data),
                "--out",
                str(stage2),
                *TINY,
                "--max_steps",
                "3",
                "--objective",
                "counts",
                "--model",
                str(trained),
                "--eval_fraction",
                "0",
            ]
        )
        == 0
    )
    before, after = _weights(trained), _weights(stage2)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("count_head.") for k in changed)


def test_early_stopping_all_time_points_and_a_geneformer_encoder(lps_data, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from perturbgen_hf import PerturbGenTokenizer

    vocab = PerturbGenTokenizer.from_pretrained(lps_data / "tokenizer").vocab_size
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=vocab,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=4096,
        )
    ).save_pretrained(tmp_path / "gf")
    out = tmp_path / "gf_model"
    # A learning rate of 0 never improves eval_loss: patience 1 stops after the second evaluation.
    assert (
        train_main(
            [
                "--data",
                str(lps_data),
                "--out",
                str(out),
                *TINY,
                "--geneformer",
                str(tmp_path / "gf"),
                "--target_time_points",
                "all",
                "--max_steps",
                "40",
                "--learning_rate",
                "0",
                "--eval_strategy",
                "steps",
                "--eval_steps",
                "2",
                "--save_steps",
                "2",
                "--early_stopping_patience",
                "1",
            ]
        )
        == 0
    )
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # not 40: stopped early
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    model = AutoModel.from_pretrained(out)
    assert model.config.encoder.hidden_size == 24
    gf = load_file(str(tmp_path / "gf" / "model.safetensors"))
    torch.testing.assert_close(
        model.encoder.embeddings.word_embeddings.weight, gf["bert.embeddings.word_embeddings.weight"]
    )


def test_heldout_time_point_is_not_trained(lps_data, tmp_path):
    out = tmp_path / "interp"
    assert (
        train_main(
            [
                "--data",
                str(lps_data),
                "--out",
                str(out),
                *TINY,
                "--max_steps",
                "3",
                "--heldout_time_point",
                "4h",
                "--eval_fraction",
                "0",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["time_points"] == ["2h", "6h"]
    metrics = json.loads((out / "training_summary.json").read_text())["final_metrics"]
    assert "eval_token_loss" in metrics  # validated on 4h, a time value never trained on


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "Unknown --preset 'huge'"),
        (["--objective", "counts"], "give --model"),
        (["--heldout_time_point", "9h"], "'9h' is not a target time point"),
        (["--objective", "both"], "Unknown --objective 'both'"),
        (["--early_stopping_patience", "2"], "needs --eval_strategy"),
    ],
)
def test_bad_training_options(lps_data, tmp_path, capsys, argv, message):
    code = cli_main(["train", "--data", str(lps_data), "--out", str(tmp_path / "m"), "--use_cpu", *argv])
    assert code == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_steps", "0"], "--max_steps must be a positive number of steps"),
        (["--max_steps", "-3"], "got -3"),
        (["--learning_rate", "-0.001"], "--learning_rate must be >= 0, got -0.001"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    ],
)
def test_a_bad_schedule_fails_before_any_folder_is_made(lps_data, tmp_path, capsys, argv, message):
    out = tmp_path / "m"
    assert cli_main(["train", "--data", str(lps_data), "--out", str(out), "--use_cpu", *TINY, *argv]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_non_empty_output_folder_is_not_overwritten(lps_data, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("keep")
    assert cli_main(["train", "--data", str(lps_data), "--out", str(tmp_path / "m"), *TINY, "--max_steps", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.txt").read_text() == "keep"


def test_missing_data_folder(tmp_path, capsys):
    assert cli_main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(lps_data, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(REPO / "scripts" / "train.py"),
        "--data",
        str(lps_data),
        "--out",
        str(out),
        *TINY,
        "--max_steps",
        "4",
        "--eval_fraction",
        "0",
        "--ddp_backend",
        "gloo",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world_size" in result.stderr or (out / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(out)
    assert torch.isfinite(next(model.parameters())).all()
    state = json.loads((out / "training_summary.json").read_text())
    assert state["data_arguments"]["data"] == str(lps_data)


def test_push_to_a_hub_then_load_by_id_and_offline_from_the_cache(trained, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.url,
            HF_TOKEN="test-token",
            HF_HOME=str(home),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            PYTHONPATH="",
        )
        push = f"from perturbgen_hf.training import push_to_hub; push_to_hub({str(trained)!r}, 'org/perturbgen-lps')"
        result = subprocess.run([sys.executable, "-c", push], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, (result.stderr[-3000:], hub.unknown)
        assert {"config.json", "model.safetensors", "modeling_perturbgen.py", "README.md", "vocab.json"} <= set(
            hub.repos["org/perturbgen-lps"]["files"]
        )
        load = textwrap.dedent("""
            import sys
            sys.modules["perturbgen_hf"] = None  # a user without the package
            import torch
            from transformers import AutoModel, AutoTokenizer
            model = AutoModel.from_pretrained("org/perturbgen-lps", trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained("org/perturbgen-lps", trust_remote_code=True)
            assert tokenizer.gene_to_id(tokenizer.target_genes[0]) > 3
            print("ONLINE", float(sum(p.sum() for p in model.parameters())))
        """)
        result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
        assert "ONLINE" in result.stdout, (result.stderr[-3000:], hub.unknown)
    expected = float(sum(p.detach().sum() for p in AutoModel.from_pretrained(trained).parameters()))
    assert float(result.stdout.split("ONLINE")[1]) == pytest.approx(expected, rel=1e-6)
    # The hub is gone: the cached copy loads by its id offline (our users' `from_pretrained("org/perturbgen-lps")`).
    offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    script = "import perturbgen_hf; from transformers import AutoModel; print(type(AutoModel.from_pretrained('org/perturbgen-lps')).__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=offline, timeout=300)
    assert "PerturbGenForConditionalGeneration" in result.stdout, result.stderr[-3000:]


def test_time_embedding_scale_by_gap_and_by_span():
    from perturbgen_hf.training import time_embedding_scale

    # Shalek without 4h: targets 2h and 6h after a 1h source
    assert time_embedding_scale([2.0, 6.0], 1.0, "gap") == pytest.approx(1 / 4)
    assert time_embedding_scale([2.0, 6.0], 1.0, "span") == pytest.approx(1 / 5)
    assert time_embedding_scale([6.0, 2.0, 4.0], 1.0) == pytest.approx(1 / 2)  # unordered; gap is the default
    assert time_embedding_scale([2.0], 1.0, "gap") == 1.0  # one target time point has no gap
    assert time_embedding_scale([2.0], None, "span") == 1.0
    with pytest.raises(ValueError, match="Unknown time_scale 'log'"):
        time_embedding_scale([2.0, 4.0], 1.0, "log")


def test_cpu_training_uses_the_arguments_the_command_line_gives(tmp_path):
    # The demo's and evaluate's training builds its argument dataclasses directly; they must be what
    # `perturbgen-hf train` parses from the same options.
    import dataclasses

    from perturbgen_hf.settings import CpuTrainingSettings
    from perturbgen_hf.training import cpu_training_arguments, parse_arguments

    settings = CpuTrainingSettings(max_steps=30, seed=4, context_mode="none", time_scale="span")
    out = tmp_path / "model"
    argv = [
        "--data",
        "tokens",
        "--out",
        str(out),
        "--preset",
        "compact",
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "0.002",
        "--warmup_steps",
        "3",
        "--max_source_length",
        "256",
        "--max_target_length",
        "128",
        "--use_cpu",
        "--freeze_encoder",
        "true",
        "--report_to",
        "none",
        "--eval_fraction",
        "0",
        "--context_mode",
        "none",
        "--time_scale",
        "span",
        "--seed",
        "4",
        "--logging_steps",
        "5",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]
    parsed = parse_arguments(argv)
    built = cpu_training_arguments("tokens", out, settings, log_every=5)
    for expected, actual in zip(parsed, built):
        assert dataclasses.asdict(actual) == dataclasses.asdict(expected)
