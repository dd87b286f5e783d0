"""Bulk captioning: what a run reads (inputs), how it streams images through the model (run)
and where the captions go (writers). The public names are re-exported here."""

from captioner.bulk.inputs import IMAGE_SUFFIXES, KeySet, Source, iter_sources, unique, walk_images
from captioner.bulk.run import BulkStats, Plan, caption_bulk, caption_chunk, plan
from captioner.bulk.writers import AppendFile, Collect, Sidecars, Sink, Stream, result_record

__all__ = [
    "IMAGE_SUFFIXES",
    "AppendFile",
    "BulkStats",
    "Collect",
    "KeySet",
    "Plan",
    "Sidecars",
    "Sink",
    "Source",
    "Stream",
    "caption_bulk",
    "caption_chunk",
    "iter_sources",
    "plan",
    "result_record",
    "unique",
    "walk_images",
]
