"""Data: text -> webdataset shards (`prepare`), shards -> batches (`loader`). No model imports."""

from mtgpt.data.manifest import check_compatible, load_manifest, verify
from mtgpt.data.sources import CORPORA, DataError

__all__ = ["CORPORA", "DataError", "check_compatible", "load_manifest", "verify"]
