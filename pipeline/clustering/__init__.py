"""Pseudo-labels by clustering: DINO CLS features of box crops (cached), whitening, faiss K-means."""
from pipeline.clustering.crops import box_pixel_bounds, crop_box, resize_shorter, resized_shape, trim_to_patch
from pipeline.clustering.features import (
    BoxFeatures, extract_box_features, l2_normalize, load_box_crops, prepare_features, whiten,
)
from pipeline.clustering.kmeans import KMeansResult, kmeans
from pipeline.clustering.labels import cluster_categories, make_pseudo_labels
from pipeline.clustering.settings import ClusteringSettings

__all__ = [
    "BoxFeatures", "ClusteringSettings", "KMeansResult", "box_pixel_bounds", "cluster_categories", "crop_box", "extract_box_features",
    "kmeans", "l2_normalize", "load_box_crops", "make_pseudo_labels", "prepare_features", "resize_shorter",
    "resized_shape", "trim_to_patch", "whiten",
]
