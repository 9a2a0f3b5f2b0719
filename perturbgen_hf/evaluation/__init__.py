"""
Evaluation of predicted cells against observed ones, beside baselines: arrays in, tidy tables out. Never trains or
predicts (the workflow of `perturbgen-hf evaluate` lives in `perturbgen_hf.commands.evaluate_workflow`).
"""

from ..settings import PROTOCOLS, EvaluationSettings
from . import baselines, metrics, scoring, splits


__all__ = ["PROTOCOLS", "EvaluationSettings", "baselines", "metrics", "scoring", "splits"]
