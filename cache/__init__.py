"""The feature cache: frozen image features extracted once (extract.py) and read back fast (store.py).

Extraction's names load on first use (PEP 562): opening and checking a cache needs neither torch nor open_clip,
so commands answer a wrong cache path or a missing subset before importing them."""

import importlib

from fastcoop.cache.store import SCHEMA_VERSION, FeatureCache

__all__ = ["SCHEMA_VERSION", "FeatureCache", "dataset_fingerprint", "extract_features"]


def __getattr__(name: str):
    if name not in ("dataset_fingerprint", "extract_features"):
        raise AttributeError(f"module 'fastcoop.cache' has no attribute '{name}'")
    return getattr(importlib.import_module("fastcoop.cache.extract"), name)
