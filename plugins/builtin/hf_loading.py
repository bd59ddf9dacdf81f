"""Load transformers models from a local directory or the local hub cache, never the network.

Every transformers plugin loads through :func:`pretrained`, which passes
``local_files_only=True``: a hub id works once its files are in the cache
(``lookstream models fetch ID`` puts them there on a machine that reaches the
hub), a local directory always works, and anything else is a clear
:class:`~plugins.models.ModelNotAvailable` instead of a surprise download.
"""

from __future__ import annotations

from typing import Any

from plugins.models import ModelContext, ModelNotAvailable


def not_available(name_or_path: str, role: str) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"the {role} model {name_or_path!r} is not on this machine. Either set name_or_path to a local "
        f"directory that holds it (config.json and weights, as written by save_pretrained), or, on a machine "
        f"that can reach the Hugging Face hub, run `lookstream models fetch {name_or_path}` to cache it."
    )


def pretrained(loader: Any, name_or_path: str, role: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name_or_path, local_files_only=True)`` with a helpful error."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(str(name_or_path), local_files_only=True, **kwargs)
    except OSError as e:
        raise not_available(str(name_or_path), role) from e


def cached_file(name_or_path: str, filename: str, role: str) -> str:
    """Path of one file of a local directory or cached hub repository."""
    from transformers.utils import cached_file as hf_cached_file

    try:
        path = hf_cached_file(str(name_or_path), filename, local_files_only=True)
    except OSError as e:
        raise not_available(str(name_or_path), role) from e
    if path is None:
        raise not_available(str(name_or_path), role)
    return path


def place(model: Any, context: ModelContext) -> tuple[Any, Any]:
    """Put a model in eval mode on the context's device (half precision on CUDA); return (model, dtype)."""
    import torch

    dtype = torch.float16 if context.device == "cuda" else torch.float32
    return model.eval().to(context.device, dtype), dtype


def option(context: ModelContext, name: str, default: Any = None, *, model: str) -> Any:
    value = context.options.get(name, default)
    if value is None:
        raise ValueError(f"models.options.{model}.{name} must be set")
    return value
