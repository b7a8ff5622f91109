"""Data loading: files in many public formats -> canonical records (see ``records``).

``load_records(path, kind, format=None, limit=None)`` is the one entry point; ``FORMATS`` maps
each ``format:`` name to its detection predicate and converters; every bad input raises
``DataError`` naming the file, the line or record, and the field.
"""

from stages.data.errors import DataError
from stages.data.formats import FORMATS
from stages.data.loader import BUILTIN_SOURCES, fingerprint_source, load_records

__all__ = ["BUILTIN_SOURCES", "FORMATS", "DataError", "fingerprint_source", "load_records"]
