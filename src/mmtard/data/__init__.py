"""Data sources behind one contract.

Classification sets yield ``(image, label, i)``, caption sets ``(image, caption, i)``: image a
float32 tensor 3xHxW in [0, 1] without mean/std normalisation, ``i`` the index of the sample
returned (streamed webdataset shards yield their string key instead; indexed shards, the training
source, follow the map-style contract). Sets carry ``classnames``,
``sample_ids`` and ``root``; ``pop_skipped()`` returns and resets the unreadable files skipped.
"""

from mmtard.data.base import ImageListDataset, check_classnames, subsample_indices
from mmtard.data.captions import CaptionCSVDataset
from mmtard.data.folders import ImageFolderDataset, folder_classnames, imagenet_classnames, imagenet_folder
from mmtard.data.imagenet_subset import imagenet_val_subset, packaged_subset_list, read_subset_list
from mmtard.data.images import IMAGE_EXTENSIONS, ImageTransform, SkipLog, load_image, to_rgb
from mmtard.data.shard_index import IndexedShardDataset
from mmtard.data.shards import ShardDataset, expand_shards
from mmtard.data.zeroshot_suite import (
    ZEROSHOT_SUITE,
    ZeroShotSuiteDataset,
    build_zeroshot_dataset,
    zeroshot_templates,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ZEROSHOT_SUITE",
    "CaptionCSVDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "ImageTransform",
    "IndexedShardDataset",
    "ShardDataset",
    "SkipLog",
    "ZeroShotSuiteDataset",
    "build_zeroshot_dataset",
    "check_classnames",
    "expand_shards",
    "folder_classnames",
    "imagenet_classnames",
    "imagenet_folder",
    "imagenet_val_subset",
    "load_image",
    "packaged_subset_list",
    "read_subset_list",
    "subsample_indices",
    "to_rgb",
    "zeroshot_templates",
]
