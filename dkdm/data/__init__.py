"""Datasets as resumable per-rank streams: image folders, npz files, the embedded digits."""

from dkdm.data.digits import load_digits
from dkdm.data.images import (
    DataError,
    DataStream,
    center_crop_arr,
    class_labels_from_names,
    list_image_files,
    load_data,
    per_rank_batch,
    read_npz,
)

__all__ = [
    "DataError",
    "DataStream",
    "center_crop_arr",
    "class_labels_from_names",
    "list_image_files",
    "load_data",
    "load_digits",
    "per_rank_batch",
    "read_npz",
]
