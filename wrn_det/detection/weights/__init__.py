"""Detector weights: the files ``MODEL.WEIGHTS`` and the predictor read, detectron2's key layout, class metadata.

    from wrn_det.detection.weights import load_detector_weights, load_inference_weights
"""
from .loading import (DetectorWeights, checkpoint_metadata, detector_file_fields, load_detector_weights,
                      load_inference_weights, num_detector_classes, read_class_metadata, unwrap)

__all__ = ["load_detector_weights", "load_inference_weights", "DetectorWeights", "checkpoint_metadata",
           "read_class_metadata", "num_detector_classes", "unwrap", "detector_file_fields"]
