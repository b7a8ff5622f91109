"""The one error the data loader raises for bad input: where it is, which field, what was expected."""

from __future__ import annotations


class DataError(ValueError):
    """A data file (or one record in it) cannot be used.

    The message always says where: ``data/x.jsonl line 7: field 'output': expected a string, got int``.
    ``line`` is the 1-based line number for JSON Lines files and the 1-based record number for JSON
    lists, Parquet files and saved datasets (``unit`` says which), so a user can find the record.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.reason = message
        self.path = path
        self.line = line
        self.field = field
        self.unit = unit
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where} {self.unit} {self.line}".strip()
        parts = [p for p in (where, f"field '{self.field}'" if self.field else "", self.reason) if p]
        return ": ".join(parts)
