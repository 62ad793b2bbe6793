"""The feature cache: frozen image features extracted once (extract.py) and read back fast (store.py)."""

from fastcoop.cache.extract import dataset_fingerprint, extract_features
from fastcoop.cache.store import SCHEMA_VERSION, FeatureCache

__all__ = ["SCHEMA_VERSION", "FeatureCache", "dataset_fingerprint", "extract_features"]
