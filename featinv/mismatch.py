"""What differs between the settings an artefact was made with and the settings asked for.

Every refusal that compares settings (a feature store's fingerprint, a checkpoint's params, an
image store's ``data`` params, a store's codec) names each differing setting the same way:
``key: <artefact> has A, <asker> wants B``, so a user reads one kind of message everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["setting_differences", "short_repr"]


def short_repr(value: Any) -> str:
    """``repr`` with long strings (hashes, fingerprints) cut to their first 12 characters."""
    return repr(value[:12] + "…") if isinstance(value, str) and len(value) > 40 else repr(value)


def setting_differences(actual: Any, expected: Any, *, has: str, wants: str, key: str = "",
                        show: Callable[[Any], str] = repr) -> list[str]:
    """``key: <has> A, <wants> B`` for every leaf setting that differs, keys in sorted order.

    Nested dicts are walked (``preprocessing.resize``); lists and tuples with equal items are
    equal (JSON attributes hold lists where the params hold tuples).

    Args:
        actual: what the artefact was made with.
        expected: what is asked for now.
        has / wants: the two sides' words, e.g. ``"store has"`` / ``"params want"``.
        key: the prefix of the keys (for recursion, or a section name).
        show: how a value is printed.
    """
    if isinstance(actual, dict) and isinstance(expected, dict):
        return [line for k in sorted(set(actual) | set(expected), key=str)
                for line in setting_differences(actual.get(k), expected.get(k), has=has, wants=wants,
                                                key=f"{key}.{k}" if key else str(k), show=show)]
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        actual, expected = list(actual), list(expected)
    return [] if actual == expected else [f"{key}: {has} {show(actual)}, {wants} {show(expected)}"]
