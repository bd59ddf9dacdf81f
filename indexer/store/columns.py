"""Row metadata in columns: what a segment knows of each row, with no Python object per row.

A shard of ten million rows cannot hold a Python object per row (one
``ItemMeta`` with its dict of attrs was about 1.2 KB, more than a 128-d
vector). A segment's rows are described here by parallel arrays instead:

==============  ========  =====================================================
column          bytes     what
==============  ========  =====================================================
``record``      8         64-bit hash of (collection, record id): finds a record's rows
``item``        2         position of the item within its record
``box``         8         the item's box in the record's image (uint16 x 4)
``label``       2         the detector's label, as a code of ``Codes.labels``
``score``       4         the detector's score
``ts``          8         the record's event time (ms)
``blob_end``    8         end of the row's blob in ``arena``: msgpack ``[id, attrs]``
==============  ========  =====================================================

with the segment's ``keys`` and ``deleted_at`` (8 bytes each, segments.py) that
is 40 + 16 = 56 bytes a row, plus the attrs' own bytes in the arena, plus 4
(keyword) or 8 (numeric) bytes for each attribute named in
``shards.keyword_attributes`` / ``shards.numeric_attributes``: those are the
filter columns a search selects rows by (``Filter``); a sealed segment of at
least ``RANGE_INDEX_MIN_ROWS`` rows adds 12 bytes a row for each numeric one
(``RangeIndex``). Collection and category are the shard's, and not stored per row.

A row's blob is unpacked only for the hits a search returns, so a query
touches the arena k times, not once per candidate. Arrays are preallocated
with room to grow: the writer fills rows past the published count, and when a
column must grow it is replaced by a larger copy, so a reader holding either
reference sees every published row (shards.py explains the rest).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np

log = logging.getLogger(__name__)

#: ``keyword`` attribute code of a row whose record has no such attribute (or no value a filter can match)
MISSING = -1
#: distinct elements of a list-valued keyword attribute that are indexed (and counted in facets), the first
#: ones in the list's order; later ones match no filter (docs/architecture.md, "Filters")
MAX_KEYWORD_ELEMENTS = 64
#: bytes of one arena gather step (vectorised; its index array is 8 times as large)
_GATHER_BYTES = 16 << 20
#: a segment of at least this many rows keeps its numeric filter columns sorted too (``RangeIndex``)
RANGE_INDEX_MIN_ROWS = 100_000
#: a range matching at most this share of a segment's rows (or all but this share) is marked row by row through
#: its ``RangeIndex``; others by comparing every row, which then costs less
RANGE_INDEX_MAX_SHARE = 1 / 16


def record_hash(collection: str, record_id: str) -> int:
    """A record's 64-bit key in the ``record`` column (lookups check the id too: a collision is harmless)."""
    digest = hashlib.blake2b(f"{collection}\0{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keyword_value(value: Any) -> str | None:
    """How a scalar keyword value is indexed and matched: case-folded text; None where it cannot be one.

    Booleans are "true"/"false" (``in_stock=true``), whole numbers have no ".0".
    Lists are the business of :func:`keyword_values`; maps are not keyword values.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.casefold()
    return None


def keyword_values(value: Any) -> tuple[str, ...]:
    """The keyword values an attribute's value has: a filter for any of them matches it, facets count each once.

    A scalar has one (or none, as :func:`keyword_value` says). A list (or
    tuple) has its elements' distinct values, in the list's order, at most
    ``MAX_KEYWORD_ELEMENTS``; an element that is not a scalar (a list, a map,
    null) is skipped, so ``["M", null]`` is ``("m",)`` and ``[]`` has none.
    """
    if not isinstance(value, list | tuple):
        word = keyword_value(value)
        return () if word is None else (word,)
    distinct: dict[str, None] = {}
    for element in value:
        word = keyword_value(element)
        if word is not None:
            distinct[word] = None
            if len(distinct) == MAX_KEYWORD_ELEMENTS:
                break
    return tuple(distinct)


#: a keyword vocabulary's entry: one value, or the sorted distinct values of a list (two or more)
Entry = str | tuple[str, ...]


def keyword_entry(value: Any) -> Entry | None:
    """The vocabulary entry a row's value is coded as: a list of one value is that value; None: MISSING."""
    if not isinstance(value, list | tuple):
        return keyword_value(value)
    values = keyword_values(value)
    if len(values) < 2:
        return values[0] if values else None
    return tuple(sorted(values))


def numeric_value(value: Any) -> float:
    """A numeric attribute's value, NaN where it is not a number (NaN matches no range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


class Vocabulary:
    """Entries by code and codes by entry, append-only: a reader may decode any code it has seen.

    An entry is a value (a label, a keyword value) or, for a list-valued
    keyword attribute, the sorted tuple of a list's distinct values
    (``keyword_entry``): each distinct combination gets one code, so a row
    keeps one int32 code whatever its list. ``containing`` answers which codes
    a filter for one value must accept (the value's own and every combination
    holding it) from an index of value -> codes, without scanning the entries.

    One writer appends; readers (query threads compiling filters, the
    checkpoint thread copying ``words``) take no lock. Everything only
    grows, and a new code is added to the index before it is appended to
    ``words``: so every code below ``len(words)`` is in the index (a filter
    relies on it, ``Filter.current``), and a reader copies an index list
    before using it.
    """

    def __init__(self, words: Iterable[Entry | list[str]] = ()) -> None:
        self.words: list[Entry] = []
        self._codes: dict[Entry, int] = {}
        self._containing: dict[str, list[int]] = {}
        for word in words:
            self.code(word if isinstance(word, str) else tuple(word))  # a checkpoint has lists for tuples

    def code(self, word: Entry) -> int:
        """The entry's code, given one if it is new (writer only)."""
        code = self._codes.get(word)
        if code is None:
            code = len(self.words)
            for value in (word,) if isinstance(word, str) else word:
                self._containing.setdefault(value, []).append(code)
            self.words.append(word)
            self._codes[word] = code
        return code

    def find(self, word: Entry) -> int | None:
        """The entry's code, or None if no row ever had it."""
        return self._codes.get(word)

    def containing(self, value: str) -> tuple[int, ...]:
        """The codes of every entry that is or holds this value (empty if no row ever had it)."""
        return tuple(self._containing.get(value, ()))  # one copy, taken under the GIL

    def __len__(self) -> int:
        return len(self.words)


@dataclass(frozen=True)
class FilterSpec:
    """Which attributes are indexed for filtering, and how (``shards.keyword_attributes`` / ``numeric_attributes``)."""

    keyword: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()

    def columns(self) -> dict[str, np.dtype]:
        return {
            **{f"kw.{a}": np.dtype(np.int32) for a in self.keyword},
            **{f"num.{a}": np.dtype(np.float64) for a in self.numeric},
        }


class Codes:
    """The shard set's vocabularies: detector labels, and the values of each keyword attribute."""

    def __init__(
        self, spec: FilterSpec, labels: Iterable[str] = (), keywords: dict[str, list[Any]] | None = None
    ) -> None:
        self.spec = spec
        self.labels = Vocabulary(labels)
        self.keywords = {name: Vocabulary((keywords or {}).get(name, ())) for name in spec.keyword}

    def to_dict(self) -> dict[str, Any]:
        """The vocabularies as msgpack writes them (a combination's tuple becomes an array, read back as a tuple)."""
        return {
            "labels": list(self.labels.words),
            "keywords": {
                n: [w if isinstance(w, str) else list(w) for w in list(v.words)] for n, v in self.keywords.items()
            },
        }


@dataclass(frozen=True)
class Condition:
    """One attribute's condition: any of some keyword codes, or a numeric range (either end open)."""

    attribute: str
    any_of: tuple[int, ...] | None = None  # codes; empty: a value no row has, so nothing matches
    low: float = -math.inf
    high: float = math.inf
    values: tuple[str, ...] = ()  # the keyword values asked for, as keyword_value folds them
    known: int = 0  # how many codes the attribute's vocabulary had when ``any_of`` was found


@dataclass(frozen=True)
class Filter:
    """Conditions that must all hold; compiled against a ``Codes`` (``compile_filter``)."""

    conditions: tuple[Condition, ...]

    def current(self, codes: Codes) -> Filter:
        """This filter with every code its values have now: a reader calls it after taking its view.

        The rows of a view were coded before it was published, so their codes
        are all known once the view is taken. A filter compiled before that
        misses a code given in between: a record rewritten from ``["S", "M"]``
        to a new combination ``["S", "M", "XL"]`` would be in no result for
        ``size=M`` at that moment. Where a vocabulary grew since, the values
        are looked up again (rare, and a dictionary lookup each).
        """
        keyword = [c for c in self.conditions if c.any_of is not None]
        if all(len(codes.keywords[c.attribute.removeprefix("kw.")]) == c.known for c in keyword):
            return self
        return Filter(
            tuple(
                c if c.any_of is None else _any_of(codes, c.attribute.removeprefix("kw."), c.values)
                for c in self.conditions
            )
        )


class UnknownAttribute(ValueError):
    """A filter names an attribute that is not indexed."""


def compile_filter(codes: Codes, keyword: dict[str, Sequence[Any]], ranges: dict[str, tuple[float, float]]) -> Filter:
    """A filter over indexed attributes: ``keyword`` any-of values, ``ranges`` inclusive [low, high].

    A keyword value matches rows coded with it and rows coded with a list
    that holds it (``Vocabulary.containing``): the codes are found here, once
    a query, and the row masks stay one ``np.isin`` per column.
    """
    conditions = []
    for name, values in keyword.items():
        if name not in codes.keywords:
            raise UnknownAttribute(name)
        folded = tuple(dict.fromkeys(v for v in map(keyword_value, values) if v is not None))
        conditions.append(_any_of(codes, name, folded))
    for name, (low, high) in ranges.items():
        if name not in codes.spec.numeric:
            raise UnknownAttribute(name)
        conditions.append(Condition(f"num.{name}", low=low, high=high))
    return Filter(tuple(conditions))


def _any_of(codes: Codes, name: str, values: tuple[str, ...]) -> Condition:
    vocabulary = codes.keywords[name]
    known = len(vocabulary)  # before the lookups: every code below it is in the index (Vocabulary)
    found = {code for value in values for code in vocabulary.containing(value)}
    return Condition(f"kw.{name}", any_of=tuple(sorted(found)), values=values, known=known)


class Columns:
    """The metadata columns of a segment's rows (see the module docstring); arrays have room past ``count``."""

    FIXED: ClassVar[dict[str, tuple[np.dtype, tuple[int, ...]]]] = {
        "record": (np.dtype(np.uint64), ()),
        "item": (np.dtype(np.int16), ()),
        "box": (np.dtype(np.uint16), (4,)),
        "label": (np.dtype(np.int16), ()),
        "score": (np.dtype(np.float32), ()),
        "ts": (np.dtype(np.int64), ()),
        "blob_end": (np.dtype(np.int64), ()),
    }

    def __init__(self, arrays: dict[str, np.ndarray], arena: np.ndarray) -> None:
        self.arrays = arrays
        self.arena = arena  # uint8: the blobs of rows 0..n one after another
        #: numeric filter column -> its rows sorted by value, for the first ``RangeIndex.count`` rows
        self.ranges: dict[str, RangeIndex] = {}

    def index_ranges(self, count: int) -> None:
        """Sort the numeric filter columns of a sealed segment's ``count`` rows (its rows never change after)."""
        if count >= RANGE_INDEX_MIN_ROWS:
            for name in self.arrays:
                if name.startswith("num."):
                    self.ranges[name] = RangeIndex.of(self.arrays[name][:count])

    # -- making ----------------------------------------------------------------------------

    @classmethod
    def empty(cls, spec: FilterSpec, capacity: int, arena_bytes: int = 0) -> Columns:
        shapes = {**cls.FIXED, **{name: (dtype, ()) for name, dtype in spec.columns().items()}}
        arrays = {name: np.empty((capacity, *shape), dtype) for name, (dtype, shape) in shapes.items()}
        return cls(arrays, np.empty(max(arena_bytes, 1024), np.uint8))

    @classmethod
    def of_items(cls, codes: Codes, rows: Sequence[tuple[str, str, int, Any, int, dict[str, Any]]]) -> Columns:
        """Columns of new rows: (collection, record id, ts, item, position, attrs) each (the writer's batch).

        ``item`` has ``box``, ``label`` and ``score`` (a store ``Item``). The
        only per-row Python work of the store is here, once per new row.
        """
        n = len(rows)
        blobs = [msgpack.packb([record_id, attrs]) for _, record_id, _, _, _, attrs in rows]
        labels = codes.labels
        arrays = {
            "record": np.fromiter((record_hash(c, i) for c, i, *_ in rows), np.uint64, n),
            "item": np.fromiter((position for *_, position, _ in rows), np.int16, n),
            "box": np.clip(np.array([item.box for *_, item, _, _ in rows], np.int64).reshape(n, 4), 0, 65535).astype(
                np.uint16
            ),
            "label": np.fromiter(
                (-1 if item.label is None else labels.code(item.label) for *_, item, _, _ in rows), np.int16, n
            ),
            "score": np.fromiter((item.score for *_, item, _, _ in rows), np.float32, n),
            "ts": np.fromiter((ts for _, _, ts, *_ in rows), np.int64, n),
            "blob_end": np.cumsum(np.fromiter(map(len, blobs), np.int64, n)),
        }
        arrays.update(_filter_columns(codes, [attrs for *_, attrs in rows]))
        return cls(arrays, np.frombuffer(b"".join(blobs), np.uint8).copy() if blobs else np.empty(0, np.uint8))

    def recompute_filters(self, codes: Codes, count: int) -> None:
        """Fill the filter columns of ``codes.spec`` from the blobs (after the configured attributes changed)."""
        self.arrays.update(_filter_columns(codes, [self.blob(r)[1] for r in range(count)]))

    def recode_missing_keywords(self, codes: Codes, count: int) -> int:
        """Code again, from their blobs, the rows with a MISSING keyword code; return how many there were.

        For a checkpoint from before list values were coded: its rows with a
        list have MISSING codes, and only rows with some MISSING code are read.
        """
        names = [f"kw.{a}" for a in codes.spec.keyword]
        missing = np.zeros(count, bool)
        for name in names:
            missing |= self.arrays[name][:count] == MISSING
        rows = np.flatnonzero(missing)
        if len(rows):
            coded = _filter_columns(codes, [self.blob(int(r))[1] for r in rows])
            for name in names:
                self.arrays[name][rows] = coded[name]
        return len(rows)

    # -- the writer: rows past the published count -----------------------------------------

    @property
    def capacity(self) -> int:
        return len(self.arrays["record"])

    def write(self, start: int, new: Columns, n: int) -> None:
        """Copy ``n`` rows of ``new`` to rows ``start..``: capacity must suffice; the arena grows as needed."""
        used = int(self.arrays["blob_end"][start - 1]) if start else 0
        size = int(new.arrays["blob_end"][n - 1]) if n else 0
        if used + size > len(self.arena):
            grown = np.empty(max(2 * len(self.arena), used + size), np.uint8)
            grown[:used] = self.arena[:used]
            self.arena = grown  # readers of the old array still find every published blob in it
        self.arena[used : used + size] = new.arena[:size]
        for name, array in self.arrays.items():
            source = new.arrays[name][:n]
            array[start : start + n] = source + used if name == "blob_end" else source

    def take(self, rows: np.ndarray, capacity: int | None = None) -> Columns:
        """These rows (ascending or not) in new arrays of at least ``capacity`` rows, their blobs repacked."""
        n = len(rows)
        out = Columns({}, np.empty(0, np.uint8))
        size = max(capacity or n, n)
        for name, array in self.arrays.items():
            column = np.empty((size, *array.shape[1:]), array.dtype)
            np.take(array, rows, axis=0, out=column[:n])
            out.arrays[name] = column
        ends = self.arrays["blob_end"]
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0)
        lengths = ends[rows] - starts
        np.cumsum(lengths, out=out.arrays["blob_end"][:n])
        out.arena = _gather_bytes(self.arena, starts, lengths)
        return out

    @classmethod
    def concat(cls, parts: Sequence[Columns], counts: Sequence[int]) -> Columns:
        """The first ``counts[i]`` rows of each part, one after another."""
        arrays = {name: np.concatenate([p.arrays[name][:c] for p, c in zip(parts, counts)]) for name in parts[0].arrays}
        offset, ends = 0, []
        for part, c in zip(parts, counts):
            ends.append(part.arrays["blob_end"][:c] + offset)
            offset += int(part.arrays["blob_end"][c - 1]) if c else 0
        arrays["blob_end"] = np.concatenate(ends) if ends else np.empty(0, np.int64)
        arena = np.concatenate([p.arena[: int(p.arrays["blob_end"][c - 1]) if c else 0] for p, c in zip(parts, counts)])
        return cls(arrays, arena)

    # -- readers ---------------------------------------------------------------------------

    def blob(self, row: int) -> tuple[str, dict[str, Any]]:
        """(record id, attrs) of a row: the one place a blob is unpacked."""
        ends = self.arrays["blob_end"]
        start = int(ends[row - 1]) if row else 0
        record_id, attrs = msgpack.unpackb(self.arena[start : int(ends[row])].tobytes())
        return record_id, attrs

    def rows_of(self, hashes: np.ndarray, count: int) -> np.ndarray:
        """Rows among the first ``count`` whose record hash is one of ``hashes`` (unsorted, any number)."""
        return np.flatnonzero(np.isin(self.arrays["record"][:count], hashes))

    def match(self, where: Filter, count: int) -> np.ndarray:
        """A boolean mask over the first ``count`` rows: True where every condition holds."""
        mask = None  # each condition's own mask, combined in place: one pass fewer a condition at 10M rows
        for c in where.conditions:
            column = self.arrays[c.attribute][:count]
            if c.any_of is not None:
                holds = np.isin(column, c.any_of) if len(c.any_of) != 1 else column == c.any_of[0]
            else:
                index = self.ranges.get(c.attribute)
                if index is not None and index.count == count:
                    holds = index.rows_within(column, c.low, c.high)
                else:
                    holds = column >= c.low  # NaN (no value) is never in range
                    holds &= column <= c.high
            if mask is None:
                mask = holds
            else:
                mask &= holds
        return np.ones(count, bool) if mask is None else mask

    def nbytes(self, count: int) -> int:
        """Bytes the first ``count`` rows take: columns, blobs and range indexes."""
        per_row = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in self.arrays.values())
        indexes = sum(index.nbytes for index in self.ranges.values())
        return per_row * count + (int(self.arrays["blob_end"][count - 1]) if count else 0) + indexes

    # -- checkpoints -----------------------------------------------------------------------

    def to_arrays(self, rows: np.ndarray | None, count: int) -> dict[str, np.ndarray]:
        """The columns of ``rows`` (all ``count`` when None), arena included, as arrays a checkpoint writes."""
        part = self.take(rows) if rows is not None else self
        n = len(rows) if rows is not None else count
        out = {name: array[:n] for name, array in part.arrays.items()}
        out["arena"] = part.arena[: int(part.arrays["blob_end"][n - 1]) if n else 0]
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], codes: Codes, lists_coded: bool = True) -> Columns:
        """Columns read back from a checkpoint: filter columns no longer configured dropped, new ones filled.

        ``lists_coded`` False (a checkpoint of format 2, from before list
        values were coded): rows with a MISSING keyword code are coded again
        from their attrs.
        """
        arena = arrays.pop("arena")
        wanted = set(cls.FIXED) | set(codes.spec.columns())
        columns = cls({name: a for name, a in arrays.items() if name in wanted}, arena)
        count = len(arrays["record"])
        if not set(codes.spec.columns()) <= set(columns.arrays):
            log.warning("indexing new filter attributes of %d rows from their attrs (once)", count)
            columns.recompute_filters(codes, count)
        elif not lists_coded:
            columns.recode_missing_keywords(codes, count)
        return columns


@dataclass(frozen=True)
class RangeIndex:
    """One numeric column's rows in the order of their values (12 bytes a row): ranges without comparing every row.

    Comparing every row costs two passes over the column (about 25 ms at 10M
    rows, the mask counted and packed). Here two binary searches find how many
    rows a range holds: where that is at most ``RANGE_INDEX_MAX_SHARE`` of
    them (half that for a one-sided range), only those are marked (3 ms for
    0.05% of 10M); where all but that share, every row is marked and the
    others unmarked; in between, a bound that no row lies beyond is not
    compared (one pass: "price under 50", 10 ms at 10M).
    Rows without a value (NaN) sort last and are in no range.
    """

    values: np.ndarray  # float64, ascending, NaN last
    rows: np.ndarray  # int32 (int64 past 2^31 rows): ``rows[i]`` holds ``values[i]``
    valued: int  # rows with a value (not NaN)

    @classmethod
    def of(cls, column: np.ndarray) -> RangeIndex:
        order = np.argsort(column)
        rows = order.astype(np.int32) if len(column) < 2**31 else order
        return cls(column[order], rows, len(column) - int(np.count_nonzero(np.isnan(column))))

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.rows.nbytes

    def rows_within(self, column: np.ndarray, low: float, high: float) -> np.ndarray:
        """A mask of the rows of ``column`` (the column this index sorts) in [low, high]."""
        start = int(np.searchsorted(self.values[: self.valued], low, side="left"))
        end = max(int(np.searchsorted(self.values[: self.valued], high, side="right")), start)
        few = self.count * RANGE_INDEX_MAX_SHARE
        one_sided = start == 0 or end == self.valued  # one comparison pass: cheaper than marking 1/32
        if end - start <= (few / 2 if one_sided else few):
            mask = np.zeros(self.count, bool)
            mask[self.rows[start:end]] = True
        elif self.count - (end - start) <= few:
            mask = np.ones(self.count, bool)
            mask[self.rows[:start]] = False
            mask[self.rows[end:]] = False
        elif end == self.valued:  # no value above high: NaN fails the comparison with low too
            mask = column >= low
        elif start == 0:
            mask = column <= high
        else:
            mask = column >= low
            mask &= column <= high
        return mask


def _filter_columns(codes: Codes, attrs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The filter columns of rows with these attrs: a keyword entry's code (or MISSING), a number (or NaN)."""
    n = len(attrs)
    out = {}
    for name, vocabulary in codes.keywords.items():
        entries = (keyword_entry(a.get(name)) for a in attrs)
        out[f"kw.{name}"] = np.fromiter((MISSING if e is None else vocabulary.code(e) for e in entries), np.int32, n)
    for name in codes.spec.numeric:
        out[f"num.{name}"] = np.fromiter((numeric_value(a.get(name)) for a in attrs), np.float64, n)
    return out


def _gather_bytes(arena: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``b"".join(arena[s:s+l])`` for each (s, l), vectorised a few megabytes at a time."""
    total = int(lengths.sum())
    out = np.empty(max(total, 1024), np.uint8)
    ends = np.cumsum(lengths)
    done = 0
    first = 0
    while first < len(lengths):
        last = int(np.searchsorted(ends, done + _GATHER_BYTES, side="right"))
        last = max(last, first + 1)
        part_lengths = lengths[first:last]
        size = int(part_lengths.sum())
        if size:
            shift = np.repeat(starts[first:last] - (np.cumsum(part_lengths) - part_lengths), part_lengths)
            out[done : done + size] = arena[shift + np.arange(size)]
        done += size
        first = last
    return out
