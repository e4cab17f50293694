"""Evaluation of the builtin engine: COCO and Pascal VOC box AP, proposal recall, and the evaluation pictures.

    from wrn_det.detection.evaluation import COCOEvaluator, inference_on_dataset
    results = inference_on_dataset(model, loader, COCOEvaluator("coco_2017_val", "output/inference"))

A dataset's metadata ``evaluator_type`` (``"coco"``, or ``"pascal_voc"`` for the VOC datasets)
decides which evaluator scores it (:func:`wrn_det.detection.train.build_evaluator`).
"""
from .coco import BACKENDS, COCOEvaluator, evaluate_coco_results, read_coco_results
from .evaluator import flatten_results, format_table, inference_on_dataset
from .proposals import ProposalEvaluator
from .voc import VOCEvaluator, evaluate_voc_results

__all__ = ["COCOEvaluator", "VOCEvaluator", "ProposalEvaluator", "inference_on_dataset", "evaluate_coco_results",
           "evaluate_voc_results", "read_coco_results", "flatten_results", "format_table", "BACKENDS"]
