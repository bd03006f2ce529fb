"""Datasets: splits.py holds a split in memory and batches it; sources.py reads the datasets
dsrpipe knows by name; folders.py lists, decodes and caches image folders; archive.py unpacks
their archives safely."""

from ..catalog import KNOWN_DATASETS, dataset_needs_root
from .archive import ArchiveCaps, extract_archive
from .sources import DEFAULT_CACHE_DIR, load_data
from .splits import Dataset, DatasetInfo, StreamingDataset, channel_stats

__all__ = [
    "DEFAULT_CACHE_DIR",
    "KNOWN_DATASETS",
    "ArchiveCaps",
    "Dataset",
    "DatasetInfo",
    "StreamingDataset",
    "channel_stats",
    "dataset_needs_root",
    "extract_archive",
    "load_data",
]
