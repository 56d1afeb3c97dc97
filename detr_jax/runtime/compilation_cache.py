"""JAX's persistent compilation cache for the detr-jax commands: each program compiled once
per machine, not at every start.

`detr-jax` turns it on before running a command (`--compilation_cache DIR|off`, or the
environment variable DETR_JAX_COMPILATION_CACHE; default `$XDG_CACHE_HOME/detr_jax/xla`,
i.e. `~/.cache/detr_jax/xla`). A `JAX_COMPILATION_CACHE_DIR` the user set is kept. In
Python, call `configure()` yourself before the first compile.

Several processes may share the directory (the hosts of one job, or runs side by side):
the cache gets a size limit, which makes JAX take a file lock around every read and write
of an entry (without one it writes entries in place, and a reader could see half of one)
and evicts the least recently used entries beyond the limit.
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib

import jax

log = logging.getLogger(__name__)

ENV_VAR = "DETR_JAX_COMPILATION_CACHE"
OFF = "off"
MAX_BYTES = 4 << 30
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def default_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/detr_jax/xla`, or `~/.cache/detr_jax/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "detr_jax" / "xla"


def configure(setting: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns the persistent cache on in a directory, or leaves it off; returns the
    directory (None: off).

    setting: a directory, "off", or None: $DETR_JAX_COMPILATION_CACHE if set, else a
    JAX_COMPILATION_CACHE_DIR the user set, else `default_dir()`.
    """
    if setting is None:
        setting = os.environ.get(ENV_VAR) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
    if str(setting) == OFF:
        return None
    path = pathlib.Path(setting).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache must not stop the command: it only costs time
        log.warning("compilation cache %s unusable (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


class CacheCounter:
    """Counts the persistent cache's hits (programs read instead of compiled) and misses
    (programs compiled, and written when they took at least
    `jax_persistent_cache_min_compile_time_secs`, 1 s by default) from the moment it is
    made."""

    def __init__(self):
        self._counts = collections.Counter()
        jax.monitoring.register_event_listener(self._record)

    def close(self) -> None:
        """Stops counting."""
        jax.monitoring.unregister_event_listener(self._record)

    def _record(self, event: str, **kwargs) -> None:
        if event in (_HIT, _MISS):
            self._counts[event] += 1

    @property
    def hits(self) -> int:
        return self._counts[_HIT]

    @property
    def misses(self) -> int:
        return self._counts[_MISS]
