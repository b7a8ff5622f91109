"""Why a stage is not cached: what differs between its fingerprint now and its newest stored artifact's."""

from __future__ import annotations

from typing import Any

from pipeline.store import Artifact

MAX_LISTED = 4  # config keys named per line; the rest are counted


def why_stale(parts: dict, latest: Artifact | None) -> list[str]:
    """One reason per changed part (config, upstream, data, code, base), compared with ``latest``."""
    if latest is None:
        return ["never run"]
    then = latest.manifest.get("fingerprint_parts")
    if then is None:
        return [f"the stored artifact {latest.fingerprint} was written by an older rayalign (no fingerprint record)"]
    reasons = []
    if "base" in parts and (parts["base"], parts.get("recipe")) != (then.get("base"), then.get("recipe")):
        reasons.append(f"base: {_changed_keys(then.get('base') or {}, parts['base'])}")
    if "config" in parts and parts["config"] != then.get("config"):
        reasons.append(f"config: {_changed_keys(then.get('config') or {}, parts['config'])}")
    for role, fp in parts.get("upstream", {}).items():
        if then.get("upstream", {}).get(role) != fp:
            reasons.append(f"upstream: {role} is now {fp} (was {then.get('upstream', {}).get(role)})")
    for name, digest in parts.get("data", {}).items():
        if then.get("data", {}).get(name) != digest:
            reasons.append(f"data: the content of {name} changed")
    if parts.get("code") != then.get("code"):
        reasons.append("code: the stages/ sources changed since it ran")
    return reasons or [f"its newest artifact {latest.fingerprint} has another fingerprint"]


def _changed_keys(old: dict, new: dict) -> str:
    changes = [f"{key} {_short(a)} -> {_short(b)}" for key, a, b in _diff(old, new)]
    shown = ", ".join(changes[:MAX_LISTED])
    return shown + (f" and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else "")


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
