"""Data loading: files in many public formats -> canonical records (see ``records``).

``load_records(path, kind, format=None, limit=None)`` reads a file, folder or saved dataset;
``FORMATS`` maps each ``format:`` name to its detection predicate and converters; every bad input
raises ``DataError`` naming the file, the line or record, and the field. Stages load through
``stages.sources``, which adds the built-in tasks (``builtin:<task>``).
"""

from stages.data.errors import DataError
from stages.data.formats import FORMATS
from stages.data.loader import fingerprint_source, load_records

__all__ = ["FORMATS", "DataError", "fingerprint_source", "load_records"]
