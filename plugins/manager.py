"""Build the plugin manager and turn the configured names into model objects.

Nothing happens at import time: :func:`build_plugin_manager` adds the specs,
registers the built-ins, loads the ``lookstream`` entry points, blocks the
disabled names and checks that every implementation matches a spec.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from plugins import PROJECT_NAME, hookspecs
from plugins.models import Classifier, Detector, Encoder, ModelContext, Reranker
from plugins.registry import Registry

#: Built-in features are plugins like any other; they can be disabled by these names.
DEFAULT_PLUGINS = (
    "plugins.builtin.whole_image",
    "plugins.builtin.efficientnet",
    "plugins.builtin.finetuned",
    "plugins.builtin.classifiers",
    "plugins.builtin.transformers_models",
    "plugins.builtin.ssd_street",
    "plugins.builtin.rerankers",
)

ROLES = ("detector", "encoder", "classifier", "reranker")


def build_plugin_manager(disabled: tuple[str, ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        if not pm.is_blocked(module_name):
            pm.register(importlib.import_module(module_name), name=module_name)
    pm.load_setuptools_entrypoints(PROJECT_NAME)
    pm.check_pending()
    return pm


def _hook(pm: pluggy.PluginManager, role: str) -> pluggy.HookCaller:
    return getattr(pm.hook, f"lookstream_register_{role}s")


def registry(pm: pluggy.PluginManager, role: str) -> Registry:
    """Collect every plugin's factories for one role."""
    reg: Registry = Registry(role)
    _hook(pm, role)(registry=reg)
    return reg


def provided_names(pm: pluggy.PluginManager) -> dict[str, dict[str, list[str]]]:
    """plugin name -> role -> model names it registers (for `lookstream plugins`)."""
    table: dict[str, dict[str, list[str]]] = {name: {} for name, _ in pm.list_name_plugin()}
    for role in ROLES:
        for impl in _hook(pm, role).get_hookimpls():
            reg: Registry = Registry(role)
            impl.function(registry=reg)
            table[impl.plugin_name][role] = reg.names
    return table


@dataclass(frozen=True)
class Models:
    detector: Detector
    encoder: Encoder
    classifier: Classifier
    #: collection -> its own detector, where it has one (``models.detectors``)
    detectors: Mapping[str, Detector] = field(default_factory=dict)
    #: re-scores the nearest hits of a query (``models.reranker``); None: off
    reranker: Reranker | None = None

    def detector_for(self, collection: str) -> Detector:
        return self.detectors.get(collection, self.detector)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_runtime(requested: str, device: str) -> str:
    """ "auto": ONNX Runtime on a CPU (about 7x eager PyTorch there, docs/models.md), PyTorch on a GPU."""
    if requested != "auto":
        return requested
    from plugins.builtin import onnx_runtime

    return "onnxruntime" if device == "cpu" and onnx_runtime.available() else "torch"


def load_models(
    pm: pluggy.PluginManager,
    detector: str,
    encoder: str,
    classifier: str,
    context: ModelContext,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    detectors: Mapping[str, str] | None = None,
    reranker: str | None = None,
) -> Models:
    """Instantiate the three configured models (and a detector per collection); an unknown name lists the known ones.

    Each factory gets ``context`` with the options configured for its own name.
    ``context.cpu_threads`` sets torch's intra-op threads for the process here,
    once, since torch has one such setting for all models.
    """
    options = options or {}
    if context.cpu_threads:
        import torch

        torch.set_num_threads(context.cpu_threads)

    def create(role: str, name: str):
        return registry(pm, role).create(name, replace(context, options=options.get(name, {})))

    default_detector = create("detector", detector)
    return Models(
        detector=default_detector,
        encoder=create("encoder", encoder),
        classifier=create("classifier", classifier),
        detectors={
            collection: create("detector", name) for collection, name in (detectors or {}).items() if name != detector
        },
        reranker=create("reranker", reranker) if reranker else None,
    )
