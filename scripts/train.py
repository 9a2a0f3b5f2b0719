"""
Train PerturbGen with transformers.Trainer; the same code path as `perturbgen-hf train`.

    python scripts/train.py --data lps_tokens --out lps_model --preset small --num_train_epochs 10
    torchrun --nproc_per_node 2 scripts/train.py --data lps_tokens --out lps_model ...        # CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 4 scripts/train.py --data lps_tokens ...    # GPUs
"""

import sys

from perturbgen_hf.training import main


if __name__ == "__main__":
    sys.exit(main())
