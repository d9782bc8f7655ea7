"""The event bus every feature hooks into: Prosody's ``util/events`` rule.

Handlers of an event run in priority order (higher first; equal priorities in
the order they were hooked).  The first handler that returns something other
than ``None`` stops propagation, and that value is what ``fire`` returns.  A
notification (``resource-unbind``, ``presence-initial`` …) is simply an event
whose handlers all return ``None``.

The router only names events (see router.py for the names); features
(``im/``, ``roster/``) decide what happens by hooking them.  This module knows
nothing of stanzas.

Greenlet safety: handlers are hooked while the server is wired, before it
serves; ``fire`` reads an immutable tuple per event, so a hook added later
never disturbs a ``fire`` that is running.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

Handler = Callable[[Any], Any]

__all__ = ["EventBus", "Hook"]


@dataclass(frozen=True)
class Hook:
    """What ``EventBus.hook`` returns: enough to unhook it again."""

    name: str
    handler: Handler
    priority: int


class EventBus:
    def __init__(self) -> None:
        self._hooks: dict[str, list[tuple[int, int, Handler]]] = {}
        self._chains: dict[str, tuple[Handler, ...]] = {}
        self._order = itertools.count()

    def hook(self, name: str, handler: Handler, priority: int = 0) -> Hook:
        entries = self._hooks.setdefault(name, [])
        entries.append((-priority, next(self._order), handler))
        entries.sort(key=lambda entry: entry[:2])
        self._chains[name] = tuple(entry[2] for entry in entries)
        return Hook(name, handler, priority)

    def unhook(self, hook: Hook) -> None:
        entries = [e for e in self._hooks.get(hook.name, ()) if e[2] is not hook.handler]
        if entries:
            self._hooks[hook.name] = entries
            self._chains[hook.name] = tuple(entry[2] for entry in entries)
        else:
            self._hooks.pop(hook.name, None)
            self._chains.pop(hook.name, None)

    def has(self, name: str) -> bool:
        return name in self._chains

    def fire(self, name: str, event: Any = None) -> Any:
        """Run the handlers of ``name``; the first non-None result, or None."""
        for handler in self._chains.get(name, ()):
            result = handler(event)
            if result is not None:
                return result
        return None
