"""Datasets (VOC, COCO, COCO20k, image folders, the demo set), image decoding, the mining loader."""
from pipeline.data.build import KINDS, build_dataset
from pipeline.data.errors import DatasetError, ImageLoadError
from pipeline.data.folder import DEMO_IMAGES, IMAGE_EXTENSIONS
from pipeline.data.images import decode_chw_float, decode_rgb, load_image, try_decode
from pipeline.data.paths import common_root, records_root, resolve_image_path
from pipeline.data.loader import MiningImages, collate_list, collate_single
from pipeline.data.records import Dataset, ImageRecord
from pipeline.data.voc import VOC_CLASSES

__all__ = [
    "KINDS", "DEMO_IMAGES", "IMAGE_EXTENSIONS", "VOC_CLASSES", "Dataset", "DatasetError", "ImageLoadError",
    "ImageRecord", "MiningImages", "build_dataset", "collate_list", "collate_single", "common_root",
    "decode_chw_float", "decode_rgb", "download_dataset", "load_image", "records_root", "resolve_image_path",
    "try_decode",
]


def download_dataset(kind: str, root: str) -> None:
    """Download and unpack ``kind`` (voc07, voc12, coco20k) under ``root``; see ``pipeline.data.download``."""
    from pipeline.data.download import download_dataset as _download  # lazy: keeps ``python -m`` quiet

    _download(kind, root)
