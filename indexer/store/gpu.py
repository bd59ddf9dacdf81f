"""Exact search on a CUDA GPU with torch: a matrix product and top-k over a shard's rows.

Used when torch sees a GPU (the project depends on faiss-cpu, which has no GPU
indexes). Rows live in a preallocated float32 CUDA tensor that mirrors the CPU
arrays of a segment: the writer copies new rows past the published count, so
readers of a published count never see a half-written row, as on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NAME = "torch-cuda"
#: The torch device of the backend; the tests run the same code on "cpu" where no GPU is present.
DEVICE = "cuda"


def available() -> bool:
    import torch

    return torch.cuda.is_available()


def allocate(capacity: int, dim: int) -> Any:
    import torch

    return torch.empty((capacity, dim), dtype=torch.float32, device=DEVICE)


def mirror(vectors: np.ndarray, capacity: int) -> Any:
    """A CUDA tensor of ``capacity`` rows whose first rows are ``vectors``."""
    tensor = allocate(capacity, vectors.shape[1])
    write(tensor, 0, vectors)
    return tensor


def write(tensor: Any, start: int, rows: np.ndarray) -> None:
    import torch

    if len(rows):
        tensor[start : start + len(rows)] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(
            tensor.device, non_blocking=False
        )


def knn(tensor: Any, count: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k over the first ``count`` rows: (scores, rows) like faiss."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(tensor.device)
    scores = q @ tensor[:count].T
    top = torch.topk(scores, k=min(k, count), dim=1)
    return top.values.cpu().numpy(), top.indices.cpu().numpy()
