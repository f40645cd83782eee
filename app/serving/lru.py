"""Bounded least-recently-used mappings on the request path.

cachetools' LRUCache, which these replace there, is written in Python: a lookup or an
insertion costs a few microseconds of method calls, several of them per uncached POST
/models. These keep their entries in an OrderedDict (C) and do the same in a few dict
operations. Not thread-safe: callers on several threads hold a lock of their own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

_MISSING = object()


class LRU:
    """At most `maxsize` entries, the least recently used forgotten first."""

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self._entries: OrderedDict = OrderedDict()
        self.maxsize = maxsize

    def get(self, key: Hashable, default=None):
        value = self._entries.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._entries.move_to_end(key)
        return value

    def __getitem__(self, key: Hashable):
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def __setitem__(self, key: Hashable, value) -> None:
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = value
        if len(entries) > self.maxsize:
            entries.popitem(last=False)

    def pop(self, key: Hashable, default=None):
        return self._entries.pop(key, default)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class SizedLRU:
    """Entries worth at most `maxsize` in all, each worth `getsizeof(value)`, the least
    recently used forgotten first; a value worth more than `maxsize` is refused with
    ValueError, as cachetools does."""

    __slots__ = ("_entries", "_getsizeof", "maxsize", "currsize")

    def __init__(self, maxsize: int, getsizeof: Callable[[object], int]) -> None:
        self._entries: OrderedDict = OrderedDict()  # key -> (value, size)
        self._getsizeof = getsizeof
        self.maxsize = maxsize
        self.currsize = 0

    def get(self, key: Hashable, default=None):
        found = self._entries.get(key)
        if found is None:
            return default
        self._entries.move_to_end(key)
        return found[0]

    def __setitem__(self, key: Hashable, value) -> None:
        size = self._getsizeof(value)
        if size > self.maxsize:
            raise ValueError("value too large")
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.currsize -= old[1]
        entries[key] = (value, size)
        self.currsize += size
        while self.currsize > self.maxsize:
            _, (_, freed) = entries.popitem(last=False)
            self.currsize -= freed

    def pop(self, key: Hashable, default=None):
        found = self._entries.pop(key, None)
        if found is None:
            return default
        self.currsize -= found[1]
        return found[0]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
