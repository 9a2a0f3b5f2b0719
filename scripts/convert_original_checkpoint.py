"""
Convert an original PerturbGen checkpoint; the same code path as `perturbgen-hf convert-original`.

    python scripts/convert_original_checkpoint.py --checkpoint count.ckpt --encoder-checkpoint encoder.ckpt \
        --token-dict token_dict.pkl --tokenid-to-rowid tokenid_to_rowid.pkl --rowid-to-gene rowid_to_gene.pkl \
        --gene-median-dict gene_medians.pkl --time-points 90min 6h 10h --out perturbgen-lps
"""

import sys

from perturbgen_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["convert-original", *sys.argv[1:]]))
