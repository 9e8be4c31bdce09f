"""Checking the on/off switches of the bundle's configs before anything runs.

On the command line ``--use_wcaa false`` arrives as the string ``"false"`` (Python Fire, which MONAI's bundle commands
use, reads only ``True`` and ``False`` as booleans), and a non-empty string is true wherever a config tests it: the
run would silently keep the feature on. Each workflow therefore checks its switches first.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["require_bools"]


def require_bools(switches: Mapping[str, Any]) -> None:
    """
    Raise unless every value of ``switches`` (config key -> value) is a bool.

    Raises:
        ValueError: naming every key whose value is not a bool, with the way to write it on the command line.
    """
    wrong = {key: value for key, value in switches.items() if not isinstance(value, bool)}
    if wrong:
        listed = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
        example = next(iter(wrong))
        raise ValueError(
            f"these switches must be true or false, got {listed}. In a JSON config write true or false; on the "
            f"command line write True or False (e.g. --{example} False): a lowercase false is read as a string, "
            "which would count as true."
        )
