"""Run a PyTorch network through ONNX Runtime: exported from the same weights, cached, never downloaded.

On a CPU, ONNX Runtime runs the built-in EfficientNet-Lite0 about seven times
faster than eager PyTorch on the same cores, with embeddings that agree to a
cosine of 0.99999 (docs/models.md, "Runtimes"). The graph is exported here, on
the machine, from the weights the plugin already loaded; nothing is fetched.

A small network (the built-in EfficientNet-Lite0) runs a batch faster as
single images side by side, one single-thread session per core, than as one
batch whose every operator is split over the cores: each image's activations
stay in the core's cache (114 against 78 images/s on 2 cores; docs/models.md).
A single image (a query) still gets every core, through one more session.
Each of those sessions also prepares its own images (``prepare``: resizing a
320x400 photo takes about 2 ms in PIL), so that runs side by side too.

The exported file is cached as ``<cache_dir>/<name>-<digest>.onnx``, where the
digest covers the weights, the input shape and the export settings: new
weights or settings export anew, the same ones load in milliseconds. Without a
cache directory (tests, one-off tools) the graph stays in memory.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from plugins.models import ModelContext

log = logging.getLogger(__name__)

#: What the exported graph depends on besides the weights; a change here exports anew.
EXPORT_SETTINGS = {"format": 1, "opset": 17, "exporter": "torchscript", "dynamic_batch": True}


#: How long an idle intra-op thread spins before it sleeps (``session.intra_op.spin_duration_us``).
SPIN_US = 1000


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


#: Prepares a batch for a network: the batch itself, or images made into one array (resized pixels).
Prepare = Callable[[Sequence[Any]], np.ndarray]


class OnnxModel:
    """A network exported to ONNX and run by ONNX Runtime sessions on the CPU: a batch in, arrays out.

    ``session`` uses every thread; ``per_image`` sessions (one thread each, if
    given) share a batch's images between them and prepare and run them one at
    a time.
    """

    def __init__(self, session: Any, path: Path | None, per_image: list[Any] | None = None) -> None:
        self.session = session
        self.path = path  # where the graph is cached, if it is
        self.input = session.get_inputs()[0].name
        self.per_image = per_image or []
        self._pool = ThreadPoolExecutor(len(self.per_image), "lookstream-onnx") if len(self.per_image) > 1 else None

    def __call__(self, batch: Sequence[Any], prepare: Prepare = np.asarray) -> list[np.ndarray]:
        """The network's outputs for a batch: an array, or anything ``prepare`` makes one of (a list of images)."""
        if self._pool is None or len(batch) < 2:
            return self._run(self.session, batch, prepare)
        bounds = np.linspace(0, len(batch), len(self.per_image) + 1).astype(int).tolist()
        shares = [batch[start:end] for start, end in itertools.pairwise(bounds) if end > start]
        parts = list(self._pool.map(self._one_by_one, self.per_image, shares, [prepare] * len(shares)))
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _one_by_one(self, session: Any, share: Sequence[Any], prepare: Prepare) -> list[np.ndarray]:
        runs = [self._run(session, share[i : i + 1], prepare) for i in range(len(share))]
        return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]

    def _run(self, session: Any, batch: Sequence[Any], prepare: Prepare) -> list[np.ndarray]:
        return session.run(None, {self.input: np.ascontiguousarray(prepare(batch))})


def runner(
    module: Any,
    input_shape: tuple[int, ...],
    name: str,
    context: ModelContext,
    *,
    input_dtype: str = "float32",
    torch_dtype: Any = None,
    per_image: bool = False,
    prepare: Prepare | None = None,
) -> Callable[[Sequence[Any]], np.ndarray]:
    """``module`` (one batch in, one tensor out) as a callable on batches, in ``context.runtime``.

    A batch is a numpy array, or with ``prepare`` whatever that makes one of
    (``prepare(images)`` -> pixels), called where the batch runs.

    "onnxruntime": exported and cached (:func:`export`), run on the CPU; with
    ``per_image`` a batch's images run side by side, one per core (for small
    networks: each such session holds its own copy of the weights).
    "torch": eager, under ``inference_mode`` on ``context.device``; the batch is
    cast to ``torch_dtype`` first if given (half precision on a GPU).
    """
    if context.runtime == "onnxruntime":
        if context.device != "cpu":
            raise ValueError("models.runtime 'onnxruntime' runs on the CPU here; use 'torch' (or 'auto') on a GPU")
        onnx = export(module, input_shape, name, context.cache_dir, context.cpu_threads, input_dtype, per_image)
        prepared = prepare or np.asarray
        return lambda batch: onnx(batch, lambda part: prepared(part).astype(input_dtype, copy=False))[0]
    if context.runtime != "torch":
        raise ValueError(f"unknown models.runtime {context.runtime!r}; expected onnxruntime or torch")

    def run(batch: Sequence[Any]) -> np.ndarray:
        import torch

        pixels = np.ascontiguousarray(prepare(batch) if prepare else batch)
        with torch.inference_mode():
            return module(torch.from_numpy(pixels).to(context.device, torch_dtype)).cpu().numpy()

    return run


def export(
    module: Any,
    input_shape: tuple[int, ...],
    name: str,
    cache_dir: Path | None,
    threads: int | None = None,
    input_dtype: str = "float32",
    per_image: bool = False,
) -> OnnxModel:
    """``module`` (a torch ``nn.Module`` taking one batch of ``input_dtype``) as an ONNX Runtime model.

    ``per_image``: also one single-thread session per thread, for batches (:class:`OnnxModel`).
    """
    digest = _digest(module, input_shape, input_dtype)
    path = cache_dir / f"{name}-{digest[:16]}.onnx" if cache_dir is not None else None
    if path is not None and path.exists():
        graph: bytes | str = str(path)
    else:
        graph = _export_bytes(module, input_shape, input_dtype)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(graph)
            os.replace(tmp, path)
            log.info("exported %s to %s", name, path)
    threads = threads or os.cpu_count() or 1
    session = _session(graph, threads)
    per_image_sessions = [_session(graph, 1) for _ in range(threads)] if per_image and threads > 1 else None
    return OnnxModel(session, path, per_image_sessions)


def _session(graph: bytes | str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers and the like are noise here
    # Idle threads spin for a millisecond, then sleep. Without spinning, every operator of a single-image
    # query waited for sleeping threads to wake (batch-1 p50 19 ms against 14); unbounded spinning kept
    # both cores busy about 50 ms after each run, away from the decode worker (docs/models.md, "Runtimes").
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _digest(module: Any, input_shape: tuple[int, ...], input_dtype: str) -> str:
    """A hash of the weights (every tensor of the state dict), the input and the export settings."""
    described = {**EXPORT_SETTINGS, "input": input_shape, "dtype": input_dtype}
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _export_bytes(module: Any, input_shape: tuple[int, ...], input_dtype: str) -> bytes:
    import torch

    example = torch.zeros(input_shape, dtype=getattr(torch, input_dtype))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about tracing; the graph is checked
        # against eager PyTorch in tests/unit/test_onnx_runtime.py instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            input_names=["pixels"],
            output_names=["output"],
            dynamic_axes={"pixels": {0: "batch"}, "output": {0: "batch"}},
            opset_version=EXPORT_SETTINGS["opset"],
            dynamo=False,
        )
    return buffer.getvalue()
