"""`benchmarks/generate.py` runs end to end on CPU with a tiny model (a GPU run uses the same code with --device)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"


@pytest.fixture(scope="module")
def generate_benchmark():
    spec = importlib.util.spec_from_file_location("generate_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_benchmark_writes_throughput_memory_and_flops(generate_benchmark, tmp_path):
    out = tmp_path / "generate.json"
    argv = [
        "--presets",
        "tiny",
        "--cells",
        "6",
        "--batch-sizes",
        "3",
        "6",
        "--source-length",
        "40",
        "--target-length",
        "12",
        "--iterations",
        "2",
        "--genes",
        "200",
        "--screen-genes",
        "2",
        "--peak-tflops",
        "1.0",
        "--out",
        str(out),
    ]
    result = generate_benchmark.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [run["batch_size"] for run in result["runs"]] == [3, 6]
    for run in result["runs"]:
        assert run["generate_cells_per_s"] > 0 and run["screen_cells_x_genes_per_s"] > 0
        assert run["peak_memory_mib"] > 0 and run["encoder_attention"] == "sdpa"
        # MFU is the achieved FLOP rate over the given peak (1 TFLOP/s here).
        assert run["mfu"] == pytest.approx(run["gflops_per_cell"] * run["generate_cells_per_s"] / 1e3)


def test_flops_per_cell_is_what_torch_counts(generate_benchmark):
    from torch.utils.flop_counter import FlopCounterMode

    model = generate_benchmark.build_model("tiny", 120, 8, 2, seed=0)
    input_ids = torch.tensor([[2, *range(4, 30), 3], [2, *range(30, 56), 3]])
    per_cell = generate_benchmark.flops_per_cell(model, input_ids, iterations=2)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.generate(input_ids[:1], num_iterations=2, generator=torch.Generator().manual_seed(0))
    # Per cell: about what one cell alone costs (the decoder's extra greedy steps depend on the batch).
    assert per_cell == pytest.approx(counter.get_total_flops(), rel=0.35)
    assert per_cell > 2 * sum(p.numel() for p in model.decoder.parameters())  # at least one pass per parameter
