"""Scoring, independent of any model: CorLoc (and the top-scoring box of a detector), multi-box scores, COCO-style
and VOC AP, Hungarian cluster-to-class matching, cluster purity/NMI. Nothing here imports a model package."""
from pipeline.evaluation.cluster_quality import cluster_quality, cluster_quality_for_boxes
from pipeline.evaluation.coco_ap import evaluate_ap
from pipeline.evaluation.corloc import CorLocResult, corloc, corloc_top1, top1_boxes
from pipeline.evaluation.detections import ap_mode, score_detections
from pipeline.evaluation.hungarian import hungarian_evaluate, to_markdown
from pipeline.evaluation.multi import MultiBoxScores, multi_box_scores
from pipeline.evaluation.voc_ap import voc_ap

__all__ = [
    "CorLocResult", "MultiBoxScores", "ap_mode", "cluster_quality", "cluster_quality_for_boxes", "corloc",
    "corloc_top1", "evaluate_ap", "hungarian_evaluate", "multi_box_scores", "score_detections", "to_markdown",
    "top1_boxes", "voc_ap",
]
