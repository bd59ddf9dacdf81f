"""The hooks lookstream calls. Each one hands plugins a registry to add to.

Names are chosen in the config (``models.detector`` and friends), so several
plugins can offer models side by side and none runs unless selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from plugins import PROJECT_NAME

if TYPE_CHECKING:
    from plugins.registry import Registry

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def lookstream_register_detectors(registry: Registry) -> None:
    """Add detector factories to ``registry``.

    :param registry: call ``registry.add(name, factory)``; ``factory(context)``
        gets a :class:`plugins.models.ModelContext` and returns a
        :class:`plugins.models.Detector`. It runs only if the config selects ``name``.
    """


@hookspec
def lookstream_register_encoders(registry: Registry) -> None:
    """Add encoder factories to ``registry``.

    :param registry: as for detectors; factories return a :class:`plugins.models.Encoder`.
    """


@hookspec
def lookstream_register_classifiers(registry: Registry) -> None:
    """Add classifier factories to ``registry``.

    :param registry: as for detectors; factories return a :class:`plugins.models.Classifier`.
    """


@hookspec
def lookstream_register_rerankers(registry: Registry) -> None:
    """Add re-ranker factories to ``registry``: a second look at the nearest candidates of a query.

    :param registry: as for detectors; factories return a :class:`plugins.models.Reranker`, whose
        ``rerank(query, candidates)`` re-scores the ``candidates`` nearest hits of each
        query item. None runs unless ``models.reranker`` names it (off by default).
    """
