"""Evaluation of predicted cells against observed ones, beside baselines: metrics, baselines and protocols."""

from . import baselines, metrics
from .protocols import PROTOCOLS, EvaluationSettings, run_evaluation


__all__ = ["PROTOCOLS", "EvaluationSettings", "baselines", "metrics", "run_evaluation"]
