"""Config keys that moved between versions: a saved config (a run's config.json, a
checkpoint's metadata) is read with its keys at their current places, so an earlier
version's run loads, resumes and compares (run_contract) as it was saved."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Keys a saved config of an earlier version may hold: where their values live now, and the
# value that was their default there and is the new place's default (left implicit, so a
# resumed run's config equals the config it was saved with).
MOVED_KEYS = {
    # 2026-12-07: the matching cost weights are the matcher's settings (loss.matcher_args).
    ("loss", "cost_class"): (("loss", "matcher_args", "cost_class"), 1.0),
    ("loss", "cost_bbox"): (("loss", "matcher_args", "cost_bbox"), 5.0),
    ("loss", "cost_giou"): (("loss", "matcher_args", "cost_giou"), 2.0),
}


def moved_keys(values: Mapping, source: str = "saved config") -> dict:
    """`values` with the keys of MOVED_KEYS at their new places (a run saved by an earlier
    version resumes with the settings it had)."""
    values = copy.deepcopy(dict(values))
    for (section, key), ((new_section, field, new_key), default) in MOVED_KEYS.items():
        old = values.get(section)
        if isinstance(old, Mapping) and key in old:
            if old[key] != default:
                target = values.setdefault(new_section, {}).setdefault(field, {})
                target.setdefault(new_key, old[key])
            values[section] = {k: v for k, v in old.items() if k != key}
            log.info("%s: %s.%s is now %s.%s.%s", source, section, key, new_section, field, new_key)
    return values
