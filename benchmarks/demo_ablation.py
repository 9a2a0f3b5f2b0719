"""
One run of `perturbgen-hf demo` (the simulator with a known truth) with some settings changed, for the ablation of
benchmarks/README.md ("The demo: what makes knockout effects follow the source").

    python benchmarks/demo_ablation.py OUT '{"max_steps": 800, "source_path": "rank"}'

The second argument is a JSON object of `perturbgen_hf.settings.DemoSettings` fields; the line printed is the scores.
"""

import json
import sys
from dataclasses import replace

from perturbgen_hf.commands.demo_workflow import run_demo
from perturbgen_hf.settings import DemoSettings


def main():
    changes = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    summary = run_demo(sys.argv[1], replace(DemoSettings(), **changes), overwrite=True, progress=False)
    record = {
        "settings": changes,
        "auroc": summary["auroc"],
        "pearson": summary["pearson"],
        "median_abs_predicted_change": summary["median_abs_predicted_change"],
        "seconds": summary["seconds"],
    }
    sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
