"""Name -> factory tables for each model role, filled by the registration hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from plugins.models import ModelContext

T = TypeVar("T")


class UnknownModel(LookupError):
    """The config names a model that no installed plugin provides."""


class Registry(Generic[T]):
    def __init__(self, role: str) -> None:
        self.role = role
        self._factories: dict[str, Callable[[ModelContext], T]] = {}

    def add(self, name: str, factory: Callable[[ModelContext], T]) -> None:
        if name in self._factories:
            raise ValueError(f"two plugins register a {self.role} named {name!r}")
        self._factories[name] = factory

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str, context: ModelContext) -> T:
        try:
            factory = self._factories[name]
        except KeyError:
            raise UnknownModel(
                f"no {self.role} named {name!r}; installed {self.role}s: {', '.join(self.names) or 'none'}"
            ) from None
        return factory(context)
