"""The HDF5 text-embedding cache: ``write_cache`` (writer) and ``TextEmbeddingCache`` (reader)."""
from cache.format import CacheError, CacheMismatchError
from cache.reader import TextEmbeddingCache
from cache.writer import write_cache

__all__ = ["CacheError", "CacheMismatchError", "TextEmbeddingCache", "write_cache"]
