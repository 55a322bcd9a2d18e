"""Value records: what ``@dataclass`` gives the config and payload objects, without its import.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize`` and ``re``): about
19 ms of every ``vmmpy`` start on the hosts measured (README, "Where these numbers come from"),
spent before the VM can boot. The objects on that path (:mod:`vmmpy.config`, :mod:`vmmpy.payload`) are plain classes that
write their own ``__init__`` and take equality, ``repr`` and ``replace`` from :class:`Record`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Any, Self


class Record:
    """Equal when of the same class with equal ``FIELDS``; ``replace`` builds a changed copy
    through ``__init__`` (so its checks run again). Mutable, hence unhashable."""

    FIELDS: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.FIELDS)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Self:
        values = {name: getattr(self, name) for name in self.FIELDS}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        values.update(changes)
        return type(self)(**values)
