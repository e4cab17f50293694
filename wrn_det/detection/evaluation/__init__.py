"""Evaluation of the builtin engine: COCO box AP, proposal recall, and the evaluation pictures.

    from wrn_det.detection.evaluation import COCOEvaluator, inference_on_dataset
    results = inference_on_dataset(model, loader, COCOEvaluator("coco_2017_val", "output/inference"))
"""
from .coco import BACKENDS, COCOEvaluator, evaluate_coco_results
from .evaluator import flatten_results, format_table, inference_on_dataset
from .proposals import ProposalEvaluator

__all__ = ["COCOEvaluator", "ProposalEvaluator", "inference_on_dataset", "evaluate_coco_results", "flatten_results",
           "format_table", "BACKENDS"]
