"""
A sweep of bad inputs across the `perturbgen-hf` commands, each made for real in a scratch folder, classified as

- clean: exit 1 or 2 with one line on stderr (no traceback) and nothing left behind; for an input that deserves a
  warning rather than an error, the run succeeds and the warning names the problem;
- traceback: an exception escaped, or stderr shows a traceback;
- crash: the process died of a signal (a segmentation fault is 139);
- silent: the command succeeded without a word;
- data loss: an earlier result or a user's file changed, or an output or staging folder was left by a failed run.

    python benchmarks/reliability_sweep.py --workdir /tmp/sweep

Writes `benchmarks/results/reliability_sweep.json` (every case, its command line, outcome and last stderr line).
Cases run in this process (one import of torch), except corrupted files, which run in a child process so that a
crash is counted rather than ending the sweep.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


RESULTS = Path(__file__).resolve().parent / "results" / "reliability_sweep.json"
SHALEK = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"


# -- inputs ------------------------------------------------------------------------------------------------------------


def _write(path, counts, times, genes, **obs_columns):
    obs = pd.DataFrame({"time": times, **obs_columns}, index=[f"c{i}" for i in range(counts.shape[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(path)
    return path


def make_inputs(folder: Path) -> dict:
    """Bad (and one good) h5ad files; returns name -> path."""
    rng = np.random.default_rng(0)
    n, g = 60, 40
    counts = sp.csr_matrix(rng.poisson(2.0, (n, g)).astype(np.float32))
    times = list(np.repeat(["0h", "2h", "6h"], n // 3))
    genes = [f"G{i}" for i in range(g)]
    groups = list(np.tile(["a", "b"], n // 2))
    paths = {"good": _write(folder / "good.h5ad", counts, times, genes, group=groups)}
    paths["missing"] = folder / "missing.h5ad"
    (folder / "folder.h5ad").mkdir()
    paths["folder"] = folder / "folder.h5ad"
    (folder / "empty.h5ad").write_bytes(b"")
    paths["empty-file"] = folder / "empty.h5ad"
    (folder / "table.h5ad").write_text("cell,G0,G1\nc0,1,2\n")
    paths["csv"] = folder / "table.h5ad"
    (folder / "binary.h5ad").write_bytes(bytes(range(256)) * 16)
    paths["binary"] = folder / "binary.h5ad"
    whole = paths["good"].read_bytes()
    (folder / "truncated.h5ad").write_bytes(whole[: len(whole) // 2])
    paths["truncated"] = folder / "truncated.h5ad"
    np.save(folder / "matrix.npy", counts.toarray())
    (folder / "matrix.h5ad").write_bytes((folder / "matrix.npy").read_bytes())
    paths["npy"] = folder / "matrix.h5ad"
    for dataset in ("indices", "indptr", "data"):
        path = folder / f"corrupt-{dataset}.h5ad"
        shutil.copy(paths["good"], path)
        _corrupt(path, dataset)
        paths[f"corrupt-{dataset}"] = path
    nan_times = list(times)
    nan_times[3] = np.nan
    paths["nan-time"] = _write(folder / "nan-time.h5ad", counts, nan_times, genes, group=groups)
    paths["float-counts"] = _write(folder / "float.h5ad", counts * 0.37, times, genes, group=groups)
    paths["negative-counts"] = _write(folder / "negative.h5ad", -counts, times, genes, group=groups)
    paths["no-cells"] = _write(folder / "no-cells.h5ad", counts[:0], [], genes)
    paths["no-genes"] = _write(folder / "no-genes.h5ad", counts[:, :0], times, [], group=groups)
    paths["one-time-point"] = _write(folder / "one-time.h5ad", counts, ["0h"] * n, genes, group=groups)
    duplicated = genes[:-3] + genes[:3]
    paths["duplicated-genes"] = _write(folder / "duplicated.h5ad", counts, times, duplicated, group=groups)
    return paths


def _corrupt(path, dataset):
    import h5py

    with h5py.File(path, "r") as handle:
        stored = handle[f"X/{dataset}"]
        info = stored.id.get_chunk_info(0) if stored.chunks else None
        offset = info.byte_offset if info else stored.id.get_offset()
        size = info.size if info else stored.id.get_storage_size()
    with open(path, "r+b") as handle:
        handle.seek(offset + size // 4)
        handle.write(np.random.default_rng(1).integers(0, 256, size // 2, dtype=np.uint8).tobytes())


def make_model(folder: Path) -> tuple[Path, Path, Path]:
    """A tokenized LPS folder, a tiny random model of its sizes and a few 1h source cells."""
    from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration
    from perturbgen_hf.cli import main
    from perturbgen_hf.tokenization import PerturbGenTokenizer

    tokens = folder / "lps_tokens"
    main(
        [
            "tokenize",
            str(SHALEK),
            "--out",
            str(tokens),
            "--time-key",
            "time",
            "--source",
            "1h",
            "--n-hvg",
            "30",
            "--no-progress",
        ]
    )
    tokenizer = PerturbGenTokenizer.from_pretrained(tokens / "tokenizer")
    description = json.loads((tokens / "perturbgen_data.json").read_text())
    config = PerturbGenConfig(
        encoder={
            "vocab_size": len(tokenizer.vocab),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 4096,
        },
        decoder_hidden_size=32,
        decoder_num_layers=1,
        decoder_num_heads=2,
        decoder_intermediate_size=64,
        num_target_genes=len(tokenizer.target_genes),
        target_genes=tokenizer.target_genes,
        time_points=description["time_points"],
        time_values=description["time_values"],
    )
    model = folder / "model"
    PerturbGenForConditionalGeneration(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    lps = ad.read_h5ad(SHALEK)
    cells = lps[np.flatnonzero((lps.obs["time"].astype(str) == "1h").to_numpy())[:6]].copy()
    source = folder / "lps_source.h5ad"
    cells.write_h5ad(source)
    return tokens, model, source


def bad_models(folder: Path, model: Path, tokens: Path) -> dict:
    models = {"model-missing": folder / "no_such_model", "model-tokens-folder": tokens}
    (folder / "empty_model").mkdir()
    models["model-empty-folder"] = folder / "empty_model"
    for name, damage in (
        ("model-bad-config", "config"),
        ("model-truncated-weights", "weights"),
        ("model-no-weights", "no-weights"),
        ("model-no-tokenizer", "no-tokenizer"),
    ):
        copy = folder / name
        shutil.copytree(model, copy)
        if damage == "config":
            (copy / "config.json").write_text("{not json")
        elif damage == "weights":
            data = (copy / "model.safetensors").read_bytes()
            (copy / "model.safetensors").write_bytes(data[: len(data) // 3])
        elif damage == "no-weights":
            (copy / "model.safetensors").unlink()
        else:
            (copy / "vocab.json").unlink()
        models[name] = copy
    return models


# -- cases -------------------------------------------------------------------------------------------------------------


def cases(inputs, tokens, model, source, models, folder):
    """(name, argv builder taking the output folder, expected: "error" or "warning", options)."""
    tok = lambda path, *extra: (  # noqa: E731
        lambda out: [
            "tokenize",
            str(path),
            "--out",
            str(out),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
            *extra,
        ]
    )
    ev = lambda path, *extra: (  # noqa: E731
        lambda out: [
            "evaluate",
            str(path),
            "--out",
            str(out),
            "--protocol",
            "heldout-time",
            "--heldout",
            "2h",
            "--time-key",
            "time",
            "--source",
            "0h",
            "--max-steps",
            "2",
            "--preset",
            "tiny",
            "--no-progress",
            *extra,
        ]
    )
    demo = lambda path, *extra: (  # noqa: E731
        lambda out: [
            "demo",
            "--adata",
            str(path),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--gene",
            "G1",
            "--out",
            str(out),
            *extra,
        ]
    )
    pert = lambda *extra, adata=source, model_=model, genes=None: (  # noqa: E731
        lambda out: [
            "perturb",
            "--model",
            str(model_),
            "--adata",
            str(adata),
            "--genes",
            *(genes or GENE),
            "--iterations",
            "1",
            "--null-perturbations",
            "0",
            "--bootstrap",
            "0",
            "--no-plots",
            "--out",
            str(out),
            *extra,
        ]
    )
    train = lambda *extra: (  # noqa: E731
        lambda out: [
            "train",
            "--data",
            str(tokens),
            "--out",
            str(out),
            "--use_cpu",
            "--report_to",
            "none",
            *extra,
        ]
    )
    bad_files = [
        "missing",
        "folder",
        "empty-file",
        "csv",
        "binary",
        "truncated",
        "npy",
        "corrupt-indices",
        "corrupt-indptr",
        "corrupt-data",
        "nan-time",
        "float-counts",
        "negative-counts",
        "no-cells",
        "no-genes",
    ]
    found = []
    for kind in bad_files:
        isolate = kind.startswith("corrupt")
        found.append((f"tokenize {kind}", tok(inputs[kind]), "error", isolate))
        found.append((f"evaluate {kind}", ev(inputs[kind]), "error", isolate))
        found.append((f"demo --adata {kind}", demo(inputs[kind]), "error", isolate))
        if kind not in ("nan-time", "one-time-point"):
            found.append((f"perturb --adata {kind}", pert(adata=inputs[kind]), "error", isolate))
    found.append(("tokenize one time point", tok(inputs["one-time-point"]), "error", False))
    found.append(("tokenize duplicated genes", tok(inputs["duplicated-genes"]), "warning", False))
    good = inputs["good"]
    yaml_bad = folder / "bad.yaml"
    yaml_bad.write_text("genes: [IL1B\nmode: : mask\n")
    yaml_unknown = folder / "unknown.yaml"
    yaml_unknown.write_text("genes: [Il1b]\nnot_an_option: 3\n")
    yaml_list = folder / "list.yaml"
    yaml_list.write_text("- a\n- b\n")
    tokenize_options = {
        "bad --time-key": ["--time-key", "hour"],
        "bad --source": ["--source", "9h"],
        "source is last": ["--source", "6h"],
        "bad --targets": ["--targets", "12h"],
        "--n-hvg 0": ["--n-hvg", "0"],
        "--num-proc 0": ["--num-proc", "0"],
        "--chunk-size 0": ["--chunk-size", "0"],
        "--pairing mapping no file": ["--pairing", "mapping"],
        "--pairing-key missing": ["--pairing", "stratified", "--pairing-key", "celltype"],
        "--gene-id-key missing": ["--gene-id-key", "ensembl"],
        "--condition-keys missing": ["--condition-keys", "donor"],
        "--tokenizer missing": ["--tokenizer", str(folder / "nope")],
        "--dictionaries missing": ["--dictionaries", str(folder / "a.pkl"), str(folder / "b.pkl")],
        "--time-order unknown": ["--time-order", "0h", "2h", "99h"],
        "--max-length 0": ["--max-length", "0"],
        "--pairing-file missing": ["--pairing", "mapping", "--pairing-file", str(folder / "none.csv")],
    }
    for name, extra in tokenize_options.items():
        found.append((f"tokenize {name}", tok(good, *extra), "error", False))
    global GENE
    GENE = [_expressed_gene(source, model)]
    perturb_options = {
        "--time-points -5": ["--time-points", "-5"],
        "--time-points inf": ["--time-points", "inf"],
        "--time-points tomorrow": ["--time-points", "tomorrow"],
        "--fdr 5": ["--fdr", "5"],
        "--fdr 0": ["--fdr", "0"],
        "--min-abs-log2fc -1": ["--min-abs-log2fc", "-1"],
        "--num-samples 0": ["--num-samples", "0"],
        "--iterations 0": ["--iterations", "0"],
        "--batch-size 0": ["--batch-size", "0"],
        "--null-perturbations -2": ["--null-perturbations", "-2"],
        "--bootstrap -1": ["--bootstrap", "-1"],
        "--config missing": ["--config", str(folder / "none.yaml")],
        "--config malformed": ["--config", str(yaml_bad)],
        "--config unknown key": ["--config", str(yaml_unknown)],
        "--config a list": ["--config", str(yaml_list)],
        "--site tgt alone": ["--site", "tgt"],
        "--targets bad pair": ["--method", "teacher_forced", "--targets", "6h"],
        "--targets missing file": ["--method", "teacher_forced", "--targets", f"2h={folder / 'none.h5ad'}"],
        "--group-key missing": ["--group-key", "celltype"],
        "--layer missing": ["--layer", "raw"],
        "--perturb-time-points with src": ["--perturb-time-points", "2h"],
        "--temperature -1": ["--temperature", "-1"],
    }
    for name, extra in perturb_options.items():
        found.append((f"perturb {name}", pert(*extra), "error", False))
    found.append(("perturb unknown gene", pert(genes=["NOTAGENE"]), "error", False))
    found.append(
        (
            "perturb gene no source cell expresses",
            pert(genes=[_expressed_gene(source, model, last=True)]),
            "error",
            False,
        )
    )
    for name, path in models.items():
        found.append((f"perturb --model {name}", pert(model_=path), "error", False))
    evaluate_options = {
        "--preset huge": ["--preset", "huge"],
        "--max-steps 0": ["--max-steps", "0"],
        "--batch-size 0": ["--batch-size", "0"],
        "--learning-rate -1": ["--learning-rate", "-1"],
        "--heldout 99h": ["--heldout", "99h"],
        "--n-hvg 0": ["--n-hvg", "0"],
        "--iterations 0": ["--iterations", "0"],
        "--model missing": ["--model", str(folder / "nope")],
        "--time-key missing": ["--time-key", "hour"],
        "--source missing": ["--source", "5h"],
        "--top-de 0": ["--top-de", "0"],
    }
    for name, extra in evaluate_options.items():
        found.append((f"evaluate {name}", ev(good, *extra), "error", False))
    found.append(
        (
            "evaluate heldout-group without --group-key",
            lambda out: [
                "evaluate",
                str(good),
                "--out",
                str(out),
                "--protocol",
                "heldout-group",
                "--heldout",
                "a",
                "--time-key",
                "time",
                "--source",
                "0h",
                "--no-progress",
            ],
            "error",
            False,
        )
    )
    found.append(
        (
            "evaluate heldout-cells --heldout-fraction 1.5",
            lambda out: [
                "evaluate",
                str(good),
                "--out",
                str(out),
                "--protocol",
                "heldout-cells",
                "--heldout-fraction",
                "1.5",
                "--time-key",
                "time",
                "--source",
                "0h",
                "--no-progress",
            ],
            "error",
            False,
        )
    )
    found.append(
        (
            "evaluate --data missing",
            lambda out: ["evaluate", "--data", str(folder / "nope"), "--out", str(out), "--protocol", "heldout-cells"],
            "error",
            False,
        )
    )
    train_options = {
        "--max_steps 0": ["--max_steps", "0"],
        "--learning_rate -1": ["--max_steps", "2", "--learning_rate", "-1"],
        "--preset huge": ["--preset", "huge"],
        "--objective bad": ["--objective", "everything"],
        "--eval_fraction 1.5": ["--eval_fraction", "1.5"],
        "--batch size 0": ["--per_device_train_batch_size", "0"],
        "--config malformed": ["--config", str(yaml_bad)],
        "--heldout_time_point unknown": ["--heldout_time_point", "x"],
    }
    for name, extra in train_options.items():
        found.append((f"train {name}", train(*extra), "error", False))
    found.append(
        (
            "train --data missing",
            lambda out: ["train", "--data", str(folder / "nope"), "--out", str(out), "--use_cpu"],
            "error",
            False,
        )
    )
    found.append(
        ("demo --max-steps 0", lambda out: ["demo", "--fast", "--max-steps", "0", "--out", str(out)], "error", False)
    )
    found.append(
        (
            "demo --null-perturbations -1",
            lambda out: ["demo", "--fast", "--null-perturbations", "-1", "--out", str(out)],
            "error",
            False,
        )
    )
    found.append(
        (
            "demo --adata without --gene",
            lambda out: ["demo", "--adata", str(good), "--time-key", "time", "--source", "0h", "--out", str(out)],
            "error",
            False,
        )
    )
    return found


GENE = ["Il1b"]


def _expressed_gene(source, model, last=False):
    """
    A gene the model reads that the source cells express (so that a perturbation is possible), or with `last`, one
    in the vocabulary that none of them expresses.
    """
    from perturbgen_hf.tokenization import PerturbGenTokenizer

    tokenizer = PerturbGenTokenizer.from_pretrained(model)
    cells = ad.read_h5ad(source)
    totals = np.asarray(cells.X.sum(0)).ravel()
    order = np.argsort(totals) if last else np.argsort(-totals)
    for column in order:
        gene = str(cells.var_names[column])
        if (totals[column] > 0) != last and tokenizer.resolve_gene(gene) is not None:
            return gene
    raise RuntimeError("no expressed gene")


# Commands whose output folder is checked for data loss: an earlier result, a user's folder, a file as --out.
def overwrite_cases(inputs, source, model, folder):
    good = inputs["good"]
    commands = {
        "tokenize": lambda out, *x: [
            "tokenize",
            str(good),
            "--out",
            str(out),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
            *x,
        ],
        "evaluate": lambda out, *x: [
            "evaluate",
            str(good),
            "--out",
            str(out),
            "--protocol",
            "heldout-time",
            "--heldout",
            "2h",
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
            *x,
        ],
        "perturb": lambda out, *x: [
            "perturb",
            "--model",
            str(model),
            "--adata",
            str(source),
            "--genes",
            GENE[0],
            "--iterations",
            "1",
            "--null-perturbations",
            "0",
            "--bootstrap",
            "0",
            "--no-plots",
            "--out",
            str(out),
            *x,
        ],
        "demo": lambda out, *x: [
            "demo",
            "--adata",
            str(good),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--gene",
            "G1",
            "--out",
            str(out),
            *x,
        ],
    }
    failing = {
        "tokenize": ["--source", "9h"],
        "evaluate": ["--preset", "huge"],
        "perturb": ["--fdr", "5"],
        "demo": ["--max-steps", "0"],
    }
    found = []
    for name, command in commands.items():
        found.append((f"{name} --overwrite on a user's folder", "foreign", command, ["--overwrite"]))
        found.append(
            (
                f"{name} --overwrite with a bad option keeps the earlier result",
                "earlier",
                command,
                ["--overwrite", *failing[name]],
            )
        )
        found.append((f"{name} --out is a file", "file", command, ["--overwrite"]))
    return found


# -- running -----------------------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_in_process(argv):
    from perturbgen_hf.cli import main

    records = _Records()
    logging.getLogger("perturbgen_hf").addHandler(records)
    stderr = io.StringIO()
    escaped = None
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:
        code, escaped = None, traceback.format_exc()
    finally:
        logging.getLogger("perturbgen_hf").removeHandler(records)
    return code, stderr.getvalue() + (escaped or ""), records.messages


def run_in_child(argv):
    done = subprocess.run(
        [sys.executable, "-m", "perturbgen_hf.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return done.returncode, done.stderr, []


def _leftovers(folder):
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and ("staging" in p.name or "replaced" in p.name)
    )


def classify(code, stderr, messages, expected, out, leftovers):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if code is None or "Traceback (most recent call last)" in stderr:
        return "traceback", last
    if code < 0 or code > 128:
        return "crash", f"exit {code}"
    if code == 0:
        if expected == "warning" and messages:
            return "clean", messages[0][:200]
        return "silent", last
    if leftovers or out.exists():
        return "data loss", f"left {leftovers or out.name}"
    return "clean", last


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch folder (created; its contents are replaced)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "inputs").mkdir(parents=True)
    (work / "runs").mkdir()
    started = time.perf_counter()
    inputs = make_inputs(work / "inputs")
    tokens, model, source = make_model(work / "inputs")
    models = bad_models(work / "inputs", model, tokens)
    rows = []
    for index, (name, builder, expected, isolate) in enumerate(
        cases(inputs, tokens, model, source, models, work / "inputs")
    ):
        parent = work / "runs" / f"{index:03d}"
        parent.mkdir()
        out = parent / "out"
        argv = builder(out)
        code, stderr, messages = (run_in_child if isolate else run_in_process)(argv)
        outcome, detail = classify(
            code, stderr, messages, expected, out if expected == "error" else parent / "none", _leftovers(parent)
        )
        rows.append(
            {"case": name, "expected": expected, "outcome": outcome, "exit": code, "detail": detail, "argv": argv}
        )
    for index, (name, kind, command, extra) in enumerate(overwrite_cases(inputs, source, model, work / "inputs")):
        parent = work / "runs" / f"ow{index:03d}"
        parent.mkdir()
        out = parent / "out"
        if kind == "foreign":
            out.mkdir()
            (out / "thesis.tex").write_text("three years")
        elif kind == "earlier":
            earlier = command(out)
            if command(out)[0] == "demo":  # the earlier demo result: a fast simulated run
                earlier = ["demo", "--fast", "--out", str(out)]
            run_in_process(earlier)
        else:
            out.write_text("a file")
        before = (
            {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
            if out.is_dir()
            else out.read_bytes()
        )
        argv = command(out, *extra)
        code, stderr, messages = run_in_process(argv)
        after = (
            {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
            if out.is_dir()
            else out.read_bytes()
        )
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        if code is None or "Traceback (most recent call last)" in stderr:
            outcome = "traceback"
        elif before != after or _leftovers(parent):
            outcome = "data loss"
        elif code == 0:
            outcome = "silent"
        else:
            outcome = "clean"
        rows.append(
            {
                "case": name,
                "expected": "error",
                "outcome": outcome,
                "exit": code,
                "detail": lines[-1] if lines else "",
                "argv": argv,
            }
        )
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("clean", "traceback", "crash", "silent", "data loss")}
    result = {"cases": len(rows), "counts": counts, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.write(f"{len(rows)} cases: {counts} ({result['seconds']} s); {args.results}\n")
    for row in rows:
        if row["outcome"] != "clean":
            sys.stdout.write(f"  {row['outcome']}: {row['case']}: {row['detail'][:160]}\n")


if __name__ == "__main__":
    main()
