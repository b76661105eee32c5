"""Changing what some objects of a loaded model run by swapping their class in place.

A swapped object keeps its tensors and settings, and copies of the model (`copy.deepcopy`, the
device copies) keep the new class, where wrapping or patching would have to be redone.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable


def swap_class(objects: Iterable[object], old: type, new: type) -> int:
    """Give every object of exactly class `old` the class `new`; returns how many."""
    n = 0
    for o in objects:
        if type(o) is old:
            o.__class__ = new
            n += 1
    return n


class ClassSwap:
    """One such swap, both ways: `apply(module)` gives the objects of diffusers' class inside
    `module` the pack's class, `undo(module)` gives them back (the benchmarks run diffusers' own
    code on the pack's loaded modules). `classes` returns (diffusers' class, the pack's) and is
    called at each use, so diffusers is imported only then; `objects` picks a module's objects."""

    def __init__(self, classes: Callable[[], tuple[type, type]],
                 objects: Callable[[object], Iterable[object]] = lambda module: module.modules()):
        self._classes, self._objects = classes, objects

    def apply(self, module) -> int:
        """How many objects changed class."""
        return swap_class(self._objects(module), *self._classes())

    def undo(self, module) -> int:
        base, new = self._classes()
        return swap_class(self._objects(module), new, base)
