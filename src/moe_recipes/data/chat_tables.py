"""Chat conversations stored as Parquet or Arrow rows (the columnar twin of chat.py's JSONL lines).

A row holds a `messages` column (a list of role/content structs), or `input` (such a list) and `output`
(one struct) columns: the two JSONL formats, column for line. Other columns are never read. Rows are
addressed by (unit, offset): the row group (Parquet) or record batch (Arrow IPC file or stream, e.g. a
`datasets` data-*.arrow file) and the row within it, which is what chat.py's offset index stores for these
files instead of byte ranges. A reader decodes one unit at a time and keeps the last few decoded, so
reading conversations in order costs one decode per unit; a random read costs one unit's decode.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_recipes.data.readers import detect_format, open_arrow, open_parquet

COLUMNAR = ("parquet", "arrow-file", "arrow-stream")
CACHED_UNITS = 4  # decoded row groups / batches kept per reader (per process)


def is_columnar(path: str | Path) -> bool:
    return detect_format(path) in COLUMNAR


def chat_columns(names: list[str], path: str | Path) -> list[str]:
    """The columns that hold the conversation: `messages`, or `input` and `output`."""
    if "messages" in names:
        return ["messages"]
    if "input" in names and "output" in names:
        return ["input", "output"]
    raise ValueError(
        f"{path}: expected a 'messages' column or 'input' and 'output' columns, got {', '.join(names)}"
    )


class TableRows:
    """Random access to the conversation columns of a Parquet or Arrow file, as JSON-like dicts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parquet = detect_format(self.path) == "parquet"
        names = open_parquet(self.path).schema_arrow.names if self.parquet else open_arrow(self.path)[1].names
        self.columns = chat_columns(names, self.path)
        self._batches: list[Any] | None = None
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batches": None, "_cache": OrderedDict()}

    def unit_sizes(self) -> list[int]:
        if self.parquet:
            meta = open_parquet(self.path).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return [b.num_rows for b in self._arrow_batches()]

    def _arrow_batches(self) -> list[Any]:
        if self._batches is None:  # memory-mapped: listing the batches reads no row data
            batches, _ = open_arrow(self.path)
            self._batches = list(batches)
        return self._batches

    def _unit(self, unit: int) -> Any:
        import pyarrow as pa

        if unit in self._cache:
            self._cache.move_to_end(unit)
            return self._cache[unit]
        try:
            if self.parquet:
                table = open_parquet(self.path).read_row_group(unit, columns=self.columns)
            else:
                table = pa.Table.from_batches([self._arrow_batches()[unit]]).select(self.columns)
        except (pa.ArrowException, OSError) as err:
            what = "row group" if self.parquet else "record batch"
            raise ValueError(f"{self.path}: {what} {unit} is corrupt or truncated ({err})") from None
        self._cache[unit] = table
        if len(self._cache) > CACHED_UNITS:
            self._cache.popitem(last=False)
        return table

    def row(self, unit: int, offset: int) -> dict[str, Any]:
        return self._unit(unit).slice(offset, 1).to_pylist()[0]

    def rows(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(unit, offset, row) of every row, in file order."""
        for unit, size in enumerate(self.unit_sizes()):
            records = self._unit(unit).to_pylist()
            assert len(records) == size, (self.path, unit)
            for offset, record in enumerate(records):
                yield unit, offset, record
