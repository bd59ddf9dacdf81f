"""Search backends: the one object a shard set asks to build, hold and search its segments.

A shard set is given one :class:`Backend`, chosen by name (``shards.backend``
in the settings, reported in ``/stats``), and every segment names the backend
that searches it; nothing else in the store knows which one runs. A backend
allocates the device copy of a growing segment's rows and writes rows into
it, searches a segment, builds sealed segments, and makes segments loaded from
a checkpoint live on its device. Every segment also keeps its rows on the CPU
(arrays, or a FAISS index), which rebuilds and checkpoints read, so a
checkpoint written on one backend loads on any other.

* ``cpu`` (:class:`FaissBackend`): FAISS on the CPU; exact search while a shard
  is small, HNSW or IVF once it is sealed (vectors stored as a :class:`Codec` says).
* ``torch-cuda`` (:class:`TorchCudaBackend`): every row also in a CUDA tensor,
  searched exactly with a matrix product and top-k.

A FAISS-GPU backend would be one more subclass here, registered in
``_BACKENDS``: its ``build_sealed`` and ``make_live`` would keep the CPU index
in ``Segment.index`` (for checkpoints and rebuilds) and its
``faiss.index_cpu_to_gpu`` copy in ``Segment.mirror``. The project depends on
faiss-cpu, which has no GPU indexes, so there is none yet.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import faiss
import numpy as np

from indexer.config import ShardSettings
from indexer.store.columns import Columns
from indexer.store.segments import RowSource, Segment, built_segment

#: An IVF search probes at least this many lists, however few ``ivf_nprobe_fraction`` of them makes.
MIN_NPROBE = 8


@dataclass(frozen=True)
class Codec:
    """How a sealed index stores each vector (``shards.vectors``).

    ``storage`` is what the index keeps of every vector: what a search ranks
    by, and what rebuilds and exact filtered passes read back. A codec with
    ``pq`` adds 4-bit product-quantisation codes to its IVF segments (FAISS
    fast-scan, :func:`pq_subquantizers` of them): a search scans the codes,
    then re-ranks ``PQ_REFINE_FACTOR`` times k of them on the stored vectors
    (``IndexRefine``). It costs memory (dim / 4 bytes a row at 128-d) and saves
    query time: at 1M x 128 with 256 lists probed, 1.5 ms against 3.7 for
    float16 at the same recall@10 (0.994), 1.5 against 3.0 for sq8 (0.981 and
    0.982). PQ codes alone are not offered: their recall@10 stops at 0.65
    (1M x 128, 32 bytes a row), and a rebuild would re-encode their
    reconstructions, compounding the error. HNSW segments (up to
    ``hnsw_max_rows``) store ``storage`` alone.
    """

    storage: str  # a name of ``STORAGES``
    pq: bool = False

    @property
    def qtype(self) -> int | None:
        """FAISS's scalar quantizer for ``storage``; None for float32."""
        return STORAGES[self.storage].qtype

    def vector_bytes(self, dim: int) -> float:
        """Bytes of one vector in an IVF segment (its stored form, and its PQ codes)."""
        return STORAGES[self.storage].bytes_per_number * dim + (pq_subquantizers(dim) / 2 if self.pq else 0)


class Storage(NamedTuple):
    """A form vectors can be stored in."""

    bytes_per_number: int
    qtype: int | None  # FAISS's scalar quantizer; None for float32
    factory: str  # its index_factory name


STORAGES: dict[str, Storage] = {
    "float32": Storage(4, None, "Flat"),
    "float16": Storage(2, faiss.ScalarQuantizer.QT_fp16, "SQfp16"),
    "sq8": Storage(1, faiss.ScalarQuantizer.QT_8bit, "SQ8"),
}


CODECS: dict[str, Codec] = {
    "float32": Codec("float32"),
    "float32+pq": Codec("float32", pq=True),
    "float16": Codec("float16"),
    "float16+pq": Codec("float16", pq=True),
    "sq8": Codec("sq8"),
    "sq8+pq": Codec("sq8", pq=True),
}
#: candidates a PQ search re-ranks on the stored vectors, per hit asked for: at 1M x 128 (64 4-bit codes a row),
#: 8 / 16 / 32 gave recall@10 0.955 / 0.987 / 0.994 at 256 lists probed (float16 alone: 0.994); at 200k x 1280
#: (320 codes) 8 was enough
PQ_REFINE_FACTOR = 32


def pq_subquantizers(dim: int) -> int:
    """4-bit PQ codes a row keeps: a quarter of ``dim`` (a code per 4 numbers), at least 64 (up to ``dim / 2``).

    At 1M x 128, 32 codes a row needed 64 candidates a hit re-ranked to reach
    the recall@10 that 64 codes reach with 32 (0.986 against 0.994); at 1280-d
    a quarter (320) reached float16's recall with 8.
    """
    wanted = max(dim // 4, min(dim // 2, 64), 1)
    return next(m for m in range(wanted, 0, -1) if dim % m == 0)


#: A row read back from an IVF index of each codec (a filtered search's exact pass), in rows read back from
#: IVF-Flat: FAISS decodes scalar-quantised rows one at a time. At 1M x 128 on one thread a row read back took
#: 0.68 / 2.16 / 2.60 us and a row scanned past a selector 13.7 / 12.8 / 16.6 ns: 50, 168 and 157 rows scanned.
#: A PQ codec reads rows back from its flat refine index and scans 4-bit codes: float16+pq and sq8+pq came out
#: within the spread of float16 and sq8 (47-63 and 40 rows scanned a row read back, against 33-97 and 42-70 in
#: the same runs), float32+pq at 9-10 (a flat float32 row is a copy).
READ_BACK_COST = {"float32": 1.0, "float16": 3.4, "sq8": 3.1, "float32+pq": 0.2, "float16+pq": 3.4, "sq8+pq": 3.1}


def read_back_cost(codec: str, dim: int) -> float:
    """``READ_BACK_COST`` for rows of ``dim`` numbers: reading a row back grows with its length, skipping one past
    a selector does not (200k rows, one thread: 0.8 / 1.1 / 2.5 us a float32 row of 128 / 512 / 1280 numbers,
    2.0 / 2.7 / 5.2 us an sq8 row; 9-17 ns a row skipped at every length). The factor is 1 at 128 and 2.3 at 1280,
    between float32's measured 2.6 and sq8's 1.6."""
    return READ_BACK_COST[codec] * (dim + 768) / (128 + 768)


def ivf_codec(index: Any) -> str:
    """How an IVF index stores its vectors: a name of ``CODECS``."""
    if isinstance(index, faiss.IndexRefine):  # PQ codes re-ranked on the vectors the refine index stores
        storage = faiss.downcast_index(index.refine_index)
        stored = storage.sq.qtype if isinstance(storage, faiss.IndexScalarQuantizer) else None
        return next(name for name, c in CODECS.items() if c.pq and c.qtype == stored)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    stored = ivf.sq.qtype if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else None
    return next(name for name, c in CODECS.items() if not c.pq and c.qtype == stored)


def ivf_search_params(index: Any, nprobe: int, sel: Any = None) -> Any:
    """Search parameters probing ``nprobe`` lists of an IVF index, PQ-refined or not, keeping rows ``sel`` allows."""
    params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)  # faiss's wrapper keeps ``sel`` alive with it
    if isinstance(index, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=params)
    return params


def probed_lists(index: Any, settings: ShardSettings) -> int:
    """The lists an IVF index's search probes: those its build tuned (:func:`tuned_nprobe`, kept in the index as
    ``nprobe``), at most ``ivf_nprobe``; one written before tuning existed holds FAISS's default of 1 and probes
    ``ivf_nprobe``."""
    ivf = faiss.extract_index_ivf(index)
    ceiling = ivf_nprobe(ivf.nlist, settings)
    return min(ivf.nprobe, ceiling) if ivf.nprobe > 1 else ceiling


class Backend(ABC):
    """What differs between backends. One instance serves a shard set's writer, builder and reader threads."""

    #: the name ``shards.backend`` chooses it by, and ``/stats`` reports
    name: ClassVar[str]

    @abstractmethod
    def allocate(self, capacity: int, dim: int) -> Any:
        """The device copy of a new growing segment's rows; None where the backend searches the CPU arrays."""

    @abstractmethod
    def write(self, mirror: Any, start: int, rows: np.ndarray) -> None:
        """Copy rows into a device copy from row ``start`` on (past the published count: no reader sees them yet)."""

    @abstractmethod
    def knn(self, segment: Segment, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-k over the segment's published rows, deleted ones included: (scores, rows) as in FAISS."""

    def knn_selected(
        self, segment: Segment, query: np.ndarray, k: int, mask: np.ndarray, matching: int, settings: ShardSettings
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k over the ``matching`` rows where ``mask`` is True (the caller counted them), inside the index;
        None where this segment cannot select."""
        return None

    @abstractmethod
    def build_sealed(
        self,
        vectors: np.ndarray | RowSource,
        keys: np.ndarray,
        columns: Columns,
        settings: ShardSettings,
        previous: Segment | None = None,
        codec: str = "float32",
        interim: bool = False,
    ) -> Segment:
        """A sealed segment over these rows, storing vectors as ``codec``; runs in a background builder thread.

        ``interim``: the segment will soon be merged (a flush, a merge of one
        size tier), so it should be quick to build rather than the best to search.
        """

    @abstractmethod
    def make_live(self, segment: Segment, settings: ShardSettings) -> Segment:
        """A segment as a checkpoint holds it (CPU arrays or a FAISS index), as this backend searches it."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class FaissBackend(Backend):
    """FAISS on the CPU: growing and small segments searched exactly, larger sealed ones with HNSW or IVF."""

    name = "cpu"

    def allocate(self, capacity: int, dim: int) -> None:
        return None  # FAISS searches the segment's own arrays

    def write(self, mirror: None, start: int, rows: np.ndarray) -> None:
        pass  # nothing to copy: see allocate

    def knn(self, segment: Segment, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if segment.index is None:
            return faiss.knn(queries, segment.vectors[: segment.count], k, metric=faiss.METRIC_INNER_PRODUCT)
        return segment.index.search(queries, k, params=segment.search_params)

    def knn_selected(
        self, segment: Segment, query: np.ndarray, k: int, mask: np.ndarray, matching: int, settings: ShardSettings
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The index searched with a selector of the matching rows (FAISS skips the others as it goes).

        The k nearest matching rows lie further out the fewer rows match (the
        k-th of them is about the (k / selectivity)-th row overall), so the
        search widens by ``1 / sqrt(selectivity)``: HNSW keeps that many times
        ``efSearch`` candidates (at most ``MAX_EF_SEARCH``; FAISS also walks on
        past refused rows until it holds k), IVF probes that many times
        ``nprobe`` lists (at 1M x 128, 5% matching: recall@10 0.95 at the
        unfiltered nprobe, 1.0 so widened). When the index still finds fewer
        than k, or when reading the matching rows back costs less than the
        rows the probed IVF lists hold (``shards.filter_exact_row_cost``, times
        the codec's :func:`read_back_cost`), it returns None: the caller scores the
        matching rows exactly.
        """
        if segment.index is None:
            return None
        selectivity = max(matching / max(segment.count, 1), 1e-9)
        if segment.kind == "ivf":
            nlist = faiss.extract_index_ivf(segment.index).nlist
            nprobe = min(nlist, math.ceil(probed_lists(segment.index, settings) / math.sqrt(selectivity)))
            cost = settings.filter_exact_row_cost * read_back_cost(ivf_codec(segment.index), segment.dim)
            if cost and matching * cost <= segment.count * nprobe / nlist:
                return None
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # its size in bytes
        if segment.kind == "hnsw":
            ef = min(int(settings.hnsw_ef_search / math.sqrt(selectivity)), MAX_EF_SEARCH)
            params = faiss.SearchParametersHNSW(efSearch=max(ef, settings.hnsw_ef_search, k), sel=selector)
        else:
            params = ivf_search_params(segment.index, nprobe, sel=selector)
        scores, rows = segment.index.search(query, k, params=params)
        del bitmap  # the selector points into it: kept alive until here
        return scores, rows

    def build_sealed(
        self,
        vectors: np.ndarray | RowSource,
        keys: np.ndarray,
        columns: Columns,
        settings: ShardSettings,
        previous: Segment | None = None,
        codec: str = "float32",
        interim: bool = False,
    ) -> Segment:
        """An index over these rows: exact flat when small, HNSW when medium, IVF when large.

        FAISS releases the GIL while it works, so queries go on meanwhile.
        An ANN index reads its rows a block at a time (see ``RowSource``).
        An IVF build keeps the ``previous`` segment's centroids while it has at
        most twice the rows they were trained for: training (k-means) is most
        of an IVF build, 15 of 18 minutes at 1M x 1280 on one core.

        An ``interim`` segment is IVF whatever its size, with the ``previous``
        segment's centroids whatever their number: HNSW inserts about
        3,000-6,000 rows a second on one core (128-d, M 32), IVF-Flat with
        centroids at hand about 100,000, and searching either costs about the
        same below 200,000 rows (docs/architecture.md, "Shards").
        """
        rows = RowSource.of(vectors)
        n, dim = len(rows), rows.dim
        if n < settings.seal_min_rows:
            return built_segment(keys, columns, "flat", self, vectors=rows.all())
        qtype = CODECS[codec].qtype
        rng = np.random.default_rng(0)
        if n <= settings.hnsw_max_rows and not interim:
            if qtype is None:
                index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexHNSWSQ(dim, qtype, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.train(rows.take(_sample(rng, n, SQ_TRAIN_ROWS)))
            index.hnsw.efConstruction = settings.hnsw_ef_construction
            for block in rows.blocks():
                index.add(block)
            params = search_params("hnsw", index, settings)
            return built_segment(keys, columns, "hnsw", self, index=index, search_params=params)
        nlist = ivf_nlist(n)
        reuse = previous is not None and previous.kind == "ivf"
        # An interim segment takes any centroids at hand: it is merged again before long.
        reuse = reuse and (interim or faiss.extract_index_ivf(previous.index).nlist >= nlist / math.sqrt(2))
        if reuse:  # trained for at least half as many rows: keep its centroids
            old = faiss.extract_index_ivf(previous.index)
            nlist = old.nlist
        pq = CODECS[codec].pq
        if pq:
            index = ivf_pq_index(dim, nlist, CODECS[codec])
            quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            if qtype is None:
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        if reuse:
            quantizer.add(old.quantizer.reconstruct_n(0, nlist))
        if reuse and qtype is None and not pq:
            index.is_trained = True
        else:  # k-means unless the quantizer already holds centroids; the scalar quantizer's ranges, the PQ codebooks
            index.train(rows.take(_sample(rng, n, SQ_TRAIN_ROWS if reuse else 64 * nlist)))
        ceiling = ivf_nprobe(nlist, settings)
        tune = not interim and tuning_wanted(ceiling, settings.ivf_target_recall)
        own = OwnNeighbours(rows, rng) if tune else None
        for block in rows.blocks():
            index.add(block)
            if own is not None:
                own.add(block)
        if not pq:  # a PQ index reads rows back from its flat refine index
            index.make_direct_map()  # for reconstruct() when the segment is rebuilt
        # FAISS keeps nprobe in the index file: a checkpoint keeps what was tuned here.
        nprobe = tuned_nprobe(index, own, ceiling, settings.ivf_target_recall) if own is not None else ceiling
        faiss.extract_index_ivf(index).nprobe = nprobe
        params = search_params("ivf", index, settings)
        return built_segment(keys, columns, "ivf", self, index=index, search_params=params)

    def make_live(self, segment: Segment, settings: ShardSettings) -> Segment:
        """Search parameters are not serialised with an index: set them again after loading."""
        params = None if segment.index is None else search_params(segment.kind, segment.index, settings)
        return replace(segment, search_params=params, mirror=None, backend=self)


def ivf_pq_index(dim: int, nlist: int, codec: Codec) -> Any:
    """An untrained IVF index of 4-bit PQ codes (fast-scan) re-ranked on the vectors ``codec`` stores."""
    factory = f"IVF{nlist},PQ{pq_subquantizers(dim)}x4fs,Refine({STORAGES[codec.storage].factory})"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.k_factor = PQ_REFINE_FACTOR  # kept in the index file, like nprobe
    return index


#: rows a scalar quantizer's ranges are trained on (IVF's k-means takes 64 a list)
SQ_TRAIN_ROWS = 65_536


def _sample(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Ascending positions of at most ``size`` of n rows, drawn at random (what ``RowSource.take`` reads)."""
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


#: the widest HNSW candidate list a filtered search keeps (``knn_selected``)
MAX_EF_SEARCH = 4096


def ivf_nlist(rows: int) -> int:
    """IVF lists for this many rows: 4√n, the low end of what FAISS's guidelines give (4√n to 16√n)."""
    return int(4 * math.sqrt(rows))


def ivf_nprobe(nlist: int, settings: ShardSettings) -> int:
    """The most IVF lists one search probes: ``ivf_nprobe_fraction`` of them, and never fewer than ``MIN_NPROBE``."""
    return max(MIN_NPROBE, int(nlist * settings.ivf_nprobe_fraction))


#: rows of a new IVF segment that :func:`tuned_nprobe` searches for to measure recall@10 (standard error about 0.003)
TUNING_QUERIES = 256
#: recall@10 :func:`tuned_nprobe` may give up against the most lists when even those fall short of the target
TUNING_SLACK = 0.005


class OwnNeighbours:
    """The exact nearest rows of ``TUNING_QUERIES`` of a segment's own rows, each row left out of its own answer.

    Gathered from the blocks an IVF build adds (:meth:`add`), so that tuning
    does not read the segment a second time (tuning a 10M x 128 float32
    segment after a restart, which has to, took 75 s).
    """

    K = 10

    def __init__(self, rows: RowSource, rng: np.random.Generator) -> None:
        self.positions = _sample(rng, len(rows), TUNING_QUERIES)
        self.queries = rows.take(self.positions)
        self._heap = faiss.ResultHeap(len(self.queries), self.K + 1, keep_max=True)
        self._start = 0

    @classmethod
    def of(cls, rows: RowSource, rng: np.random.Generator) -> OwnNeighbours:
        """Gathered in a pass of its own, for an index already built."""
        own = cls(rows, rng)
        for block in rows.blocks():
            own.add(block)
        return own

    def add(self, block: np.ndarray) -> None:
        """The next rows of the segment, in order."""
        found_k = min(self.K + 1, len(block))
        scores, found = faiss.knn(self.queries, block, found_k, metric=faiss.METRIC_INNER_PRODUCT)
        self._heap.add_result(scores, np.where(found >= 0, found + self._start, -1))
        self._start += len(block)

    def exact(self) -> list[set[int]]:
        self._heap.finalize()
        return [set(row[row != q][: self.K].tolist()) for q, row in zip(self.positions, self._heap.I)]


def tuning_wanted(ceiling: int, target: float) -> bool:
    """Whether :func:`tuned_nprobe` would measure anything (a target of 1 always probes ``ceiling``)."""
    return target < 1 and ceiling > MIN_NPROBE


def tuned_nprobe(index: Any, own: OwnNeighbours, ceiling: int, target: float) -> int:
    """The fewest lists (``MIN_NPROBE`` doubled, up to ``ceiling``) whose recall@10 reaches ``target`` on this segment.

    A fixed share of the lists probes a share of the rows, so its cost grows
    with the segment while the lists recall needs barely do: with 4√n lists,
    256 give recall@10 0.988 at 1M x 128 and 0.983 at 10M, where 1/16 of the
    lists (790) cost 48 ms against 17 (docs/benchmarks.md). So each new IVF
    segment measures it: ``TUNING_QUERIES`` of its own rows (:class:`OwnNeighbours`)
    are searched with more lists until the target is reached. Where even
    ``ceiling`` falls short (a quantised codec's error, which more lists cannot
    undo), the fewest within ``TUNING_SLACK`` of it.
    """
    if not tuning_wanted(ceiling, target):
        return ceiling
    k, exact = own.K, own.exact()

    def recall(nprobe: int) -> float:
        _, found = index.search(own.queries, k + 1, params=ivf_search_params(index, nprobe))
        hits = sum(len(truth & set(row[row != q][:k].tolist())) for q, row, truth in zip(own.positions, found, exact))
        return hits / sum(len(truth) for truth in exact)

    ladder = [p for p in (MIN_NPROBE * 2**i for i in range(32)) if p < ceiling] + [ceiling]
    measured = {}
    for nprobe in ladder:
        measured[nprobe] = recall(nprobe)
        if measured[nprobe] >= target:
            return nprobe
    enough = measured[ceiling] - TUNING_SLACK
    return next(p for p in ladder if measured[p] >= enough)


def search_params(kind: str, index: Any, settings: ShardSettings) -> Any:
    """How a sealed index of this kind is searched; FAISS does not serialise it, so a build and a load both set it.

    An IVF index probes :func:`probed_lists`.
    """
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=settings.hnsw_ef_search)
    if kind == "ivf":
        return ivf_search_params(index, probed_lists(index, settings))
    raise ValueError(f"not a FAISS index kind: {kind!r}")


class TorchCudaBackend(Backend):
    """Exact search on a CUDA GPU with torch: a matrix product and top-k over a segment's rows.

    Used where torch sees a GPU (the project depends on faiss-cpu, which has no
    GPU indexes). Rows live in a preallocated float32 tensor on the device that
    mirrors the CPU arrays of a segment: the writer copies new rows past the
    published count, so readers of a published count never see a half-written
    row, as on the CPU. torch is imported by the methods that use it, so
    choosing a backend by name costs nothing where it is not used.
    """

    name = "torch-cuda"

    def __init__(self, device: str = "cuda") -> None:
        #: the torch device; the tests run the same code on "cpu" where torch sees no GPU
        self.device = device

    @staticmethod
    def available() -> bool:
        import torch

        return torch.cuda.is_available()

    def allocate(self, capacity: int, dim: int) -> Any:
        import torch

        return torch.empty((capacity, dim), dtype=torch.float32, device=self.device)

    def write(self, mirror: Any, start: int, rows: np.ndarray) -> None:
        import torch

        if len(rows):
            mirror[start : start + len(rows)] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(
                mirror.device, non_blocking=False
            )

    def knn(self, segment: Segment, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        rows = segment.mirror
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(rows.device)
        scores = q @ rows[: segment.count].T
        top = torch.topk(scores, k=min(k, segment.count), dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()

    def knn_selected(
        self, segment: Segment, query: np.ndarray, k: int, mask: np.ndarray, matching: int, settings: ShardSettings
    ) -> tuple[np.ndarray, np.ndarray]:
        """The matrix product over every row, the others' scores set to -inf before top-k."""
        import torch

        rows = segment.mirror
        q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).to(rows.device)
        scores = (q @ rows[: segment.count].T)[0]
        scores[~torch.from_numpy(mask).to(rows.device)] = -math.inf
        top = torch.topk(scores, k=min(k, matching))
        return top.values.cpu().numpy()[None], top.indices.cpu().numpy()[None]

    def build_sealed(
        self,
        vectors: np.ndarray | RowSource,
        keys: np.ndarray,
        columns: Columns,
        settings: ShardSettings,
        previous: Segment | None = None,
        codec: str = "float32",
        interim: bool = False,
    ) -> Segment:
        """Every sealed segment is exact, flat and float32: a matrix product on a GPU beats an ANN index on a CPU."""
        flat = RowSource.of(vectors).all()
        return built_segment(keys, columns, "flat", self, vectors=flat, mirror=self._mirror(flat, max(len(flat), 1)))

    def make_live(self, segment: Segment, settings: ShardSettings) -> Segment:
        """Flat rows mirrored on the device; an index's rows are reconstructed from it and the index dropped."""
        if segment.backend is self:
            return segment
        vectors = segment.row_vectors(np.arange(segment.count)) if segment.vectors is None else segment.vectors
        return replace(
            segment,
            kind="flat",
            vectors=vectors,
            index=None,
            search_params=None,
            mirror=self._mirror(vectors[: segment.count], max(len(vectors), 1)),
            backend=self,
        )

    def _mirror(self, vectors: np.ndarray, capacity: int) -> Any:
        """A device tensor of ``capacity`` rows whose first rows are ``vectors``."""
        mirror = self.allocate(capacity, vectors.shape[1])
        self.write(mirror, 0, vectors)
        return mirror


_BACKENDS: dict[str, type[Backend]] = {backend.name: backend for backend in (FaissBackend, TorchCudaBackend)}


def by_name(name: str) -> Backend:
    """The backend of this name; an unknown name is an error that lists the known ones."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown search backend {name!r}; known backends: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]()


def choose(setting: str) -> Backend:
    """The backend for ``shards.backend``: "auto" is torch-cuda where torch sees a GPU, cpu (FAISS) otherwise."""
    if setting == "auto":
        return TorchCudaBackend() if TorchCudaBackend.available() else FaissBackend()
    return by_name(setting)
