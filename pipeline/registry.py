"""A tiny typed registry of factories (the timm pattern, without the magic).

Usage::

    BACKBONES: Registry[BackboneFactory] = Registry("backbone")

    @BACKBONES.register("mobilenetv2-imagenet")
    def mobilenetv2_imagenet(...): ...

    factory = BACKBONES.get("mobilenetv2-imagenet")
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pipeline.errors import FreezeframeError

T = TypeVar("T")


class RegistryError(FreezeframeError, KeyError):
    """An unknown name was asked of a registry (the message lists the known names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps a stable, user-facing name to a factory (or any object)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def register_named(self, name: str) -> Callable[[T], T]:
        """Class decorator: register the class under ``name`` and set its ``name`` attribute to it."""

        def deco(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.register(name)(cls)

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
