"""Files as numbered records, read in parallel ranges by one Ray Data datasource.

Ray Data's own file readers read each file in one task (`FileBasedDatasource` splits the
list of files, never a file), `read_json(lines=True)` fails the whole read on one malformed
line (and takes no `filesystem`), and none of them numbers lines. Bulk jobs need all three:
a 10 GB JSONL file read by many tasks, a bad line kept as a row, and each row's file and
line, so an error names them and a resumed job skips the lines it has done.
`RangeDatasource` (the public `ray.data.Datasource` API) reads files of lines split into
byte ranges — a range owns the lines that start in it — and Parquet files split by row
group. A line's number needs the line breaks before its range: `line_ranges` counts them
first in parallel Ray tasks (one cheap pass; nothing is parsed or kept).

Rows: `file` (path in its filesystem), `line` (1-based line, or row for Parquet), `range`
(index of the read range) and `seq` (index of the row among those its range emits, so a
consumer can tell which rows of a range are contiguous), plus `data` (a line's bytes
without its line break; the final empty "line" after a trailing break is none) or the
Parquet file's chosen columns. `skip` leaves out lines already done: per file key
(`file_key`), inclusive (first, last) line intervals.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

Kind = Literal["lines", "parquet"]
Intervals = Sequence[tuple[int, int]]
#: Automatic range size: the input split into about this many ranges, within the bounds.
TARGET_RANGES, MIN_RANGE_BYTES, MAX_RANGE_BYTES = 256, 1 << 20, 64 << 20
_BLOCK_ROWS = 4096
_COUNT_CHUNK = 8 << 20


@dataclass(frozen=True)
class Range:
    """One read unit: bytes [start, end) of a file of lines, or row groups [start, end) of
    a Parquet file; `first` is the number of the first line (row) starting in it."""

    path: str
    start: int
    end: int
    first: int
    size: int  # bytes, for Ray's size estimate


def file_key(path: str) -> str:
    """A short stable name of a file (its path's SHA-256, 16 hex digits), for part names."""
    return hashlib.sha256(path.encode()).hexdigest()[:16]


def range_bytes_for(total: int) -> int:
    """The automatic byte range size: `TARGET_RANGES` ranges, 1 MiB to 64 MiB each."""
    return min(MAX_RANGE_BYTES, max(MIN_RANGE_BYTES, math.ceil(total / TARGET_RANGES)))


def _count_breaks(fs: pafs.FileSystem, spans: list[tuple[str, int, int]]) -> list[int]:
    """Line breaks in bytes [lo, hi) of each span, read in chunks."""
    out = []
    for path, lo, hi in spans:
        count = 0
        with fs.open_input_file(path) as f:
            f.seek(lo)
            left = hi - lo
            while left > 0:
                chunk = f.read(min(_COUNT_CHUNK, left))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                left -= len(chunk)
        out.append(count)
    return out


def line_ranges(fs: pafs.FileSystem, paths: Sequence[str], range_bytes: int | None) -> list[Range]:
    """Byte ranges of files of lines (`range_bytes` each; None: `range_bytes_for`), each
    with the number of its first line, from a parallel count of the breaks before it."""
    import ray

    sizes = [int(fs.get_file_info(p).size or 0) for p in paths]
    step = range_bytes or range_bytes_for(sum(sizes))
    spans = [
        (path, k * step, min(size, (k + 1) * step))
        for path, size in zip(paths, sizes, strict=True)
        for k in range(max(1, math.ceil(size / step)))
    ]
    # range k's first line is 2 + the breaks in [0, start - 1): count [start - 1, end - 1)
    shifted = [(p, max(s - 1, 0), max(e - 1, 0)) for p, s, e in spans]
    count = ray.remote(_count_breaks)
    groups = [list(g) for g in np.array_split(np.arange(len(shifted)), min(len(shifted), 64))]
    refs = [count.remote(fs, [shifted[i] for i in g]) for g in groups]
    counts = [c for part in ray.get(refs) for c in part]
    out, before = [], 0
    for (path, start, end), breaks in zip(spans, counts, strict=True):
        if start == 0:
            before = 0
        out.append(Range(path, start, end, 1 if start == 0 else before + 2, end - start))
        before += breaks
    return out


def parquet_ranges(fs: pafs.FileSystem, paths: Sequence[str]) -> list[Range]:
    """One range per row group of each Parquet file (from the footers alone)."""
    out = []
    for path in paths:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        first = 1
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            out.append(Range(path, g, g + 1, first, group.total_byte_size))
            first += group.num_rows
    return out


def _keep(lines: np.ndarray, skip: Intervals) -> np.ndarray:
    """Mask of the lines outside the sorted, disjoint (first, last) intervals."""
    if not skip:
        return np.ones(len(lines), dtype=bool)
    starts = np.array([lo for lo, _ in skip])
    ends = np.array([hi for _, hi in skip])
    k = np.searchsorted(starts, lines, side="right") - 1
    return ~((k >= 0) & (lines <= ends[np.maximum(k, 0)]))


def _owned_lines(f: pa.NativeFile, r: Range) -> list[bytes]:
    """The lines that start in bytes [start, end), the last one read to its end."""
    lo = max(r.start - 1, 0)
    f.seek(lo)
    body = f.read(r.end - lo)
    if r.start > 0:  # a line starts after each break at or after start - 1
        cut = body.find(b"\n")
        if cut < 0 or cut == len(body) - 1:
            return []
        body = body[cut + 1 :]
    while body and not body.endswith(b"\n"):
        more = f.read(1 << 16)
        if not more:
            break
        cut = more.find(b"\n")
        body += more if cut < 0 else more[: cut + 1]
    lines = body.split(b"\n")
    if body.endswith(b"\n") or not body:
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _blocks(
    r: Range, index: int, data: pa.Table, skip: Intervals, block_rows: int
) -> Iterator[pa.Table]:
    """A range's rows as blocks: file, line, range, seq and the data columns."""
    lines = np.arange(r.first, r.first + data.num_rows, dtype=np.int64)
    keep = _keep(lines, skip)
    data, lines = data.filter(pa.array(keep)), lines[keep]
    for lo in range(0, data.num_rows, block_rows):
        part = data.slice(lo, block_rows)
        n = part.num_rows
        head = {
            "file": pa.array([r.path] * n, pa.string()),
            "line": pa.array(lines[lo : lo + n]),
            "range": pa.array(np.full(n, index, dtype=np.int64)),
            "seq": pa.array(np.arange(lo, lo + n, dtype=np.int64)),
        }
        yield pa.table({**head, **{c: part.column(c) for c in part.column_names}})


def _read(
    fs: pafs.FileSystem,
    kind: Kind,
    columns: Sequence[str],
    tasks: list[tuple[int, Range, Intervals]],
    block_rows: int,
) -> Iterator[pa.Table]:
    for index, r, skip in tasks:
        with fs.open_input_file(r.path) as f:
            if kind == "lines":
                data = pa.table({"data": pa.array(_owned_lines(f, r), pa.binary())})
            else:
                parquet = pq.ParquetFile(f)
                present = [c for c in columns if c in parquet.schema_arrow.names]
                data = parquet.read_row_groups(range(r.start, r.end), columns=present)
            yield from _blocks(r, index, data, skip, block_rows)


class RangeDatasource(Datasource):
    """Ranges of files read as numbered records (module docstring), up to `parallelism`
    read tasks of consecutive ranges; each task gets only the skip intervals of its own."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        ranges: Sequence[Range],
        kind: Kind,
        columns: Sequence[str] = (),
        skip: Mapping[str, Intervals] | None = None,
        block_rows: int = _BLOCK_ROWS,
    ) -> None:
        super().__init__()
        self.fs, self.ranges, self.kind, self.columns = fs, list(ranges), kind, list(columns)
        self.skip, self.block_rows = dict(skip or {}), block_rows

    def get_name(self) -> str:
        return f"ReadRanges({self.kind})"

    def estimate_inmemory_data_size(self) -> int:
        return sum(r.size for r in self.ranges)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        work = [(i, r, self._skipped(i)) for i, r in enumerate(self.ranges)]
        out = []
        for chunk in np.array_split(np.arange(len(work)), max(1, min(len(work), parallelism))):
            mine = [work[i] for i in chunk]
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=sum(r.size for _, r, _ in mine),
                input_files=tuple(sorted({r.path for _, r, _ in mine})),
                exec_stats=None,
            )
            read = partial(_read, self.fs, self.kind, self.columns, mine, self.block_rows)
            out.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return out

    def _skipped(self, index: int) -> Intervals:
        """The skip intervals that can touch range `index`: from its first line to the
        next range's of the same file (ranges of a file are consecutive, in order)."""
        r = self.ranges[index]
        done = self.skip.get(file_key(r.path), ())
        if not done:
            return []
        following = self.ranges[index + 1] if index + 1 < len(self.ranges) else None
        stop = following.first if following is not None and following.path == r.path else None
        k = max(bisect.bisect_right([lo for lo, _ in done], r.first) - 1, 0)
        return [(lo, hi) for lo, hi in done[k:] if (stop is None or lo < stop) and hi >= r.first]
