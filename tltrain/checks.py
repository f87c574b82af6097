"""Config value checks shared by every stage's config dataclass (preprocessing, engine, loaders, schedule, run).

Kept on the ground floor (it needs only tltrain.errors and tltrain.safe_io) so that any config module can use it
without importing the engine or anything above it.
"""
from __future__ import annotations

from collections.abc import Callable

from tltrain.errors import ConfigError
from tltrain.safe_io import is_number


def check_number(key: str, value, low: float | None = None, high: float | None = None, *, below: bool = False,
                 above: bool = False, integer: bool = False) -> None:
    """ConfigError unless value is a finite number (a whole one when integer) in its range, checked before the run
    starts: a probability of 2 or a NaN learning rate would otherwise fail, or silently diverge, mid-training.

    below/above make the bounds exclusive: value < high, value > low."""
    ok = is_number(value, integer)
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value < high if below else value <= high
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        left = "" if low is None else f"{'>' if above else '>='} {low:g}"
        right = "" if high is None else f"{'<' if below else '<='} {high:g}"
        where = " and ".join(part for part in (left, right) if part)
        raise ConfigError(f"{key}={value!r} must be {kind}{' ' + where if where else ''}")


#: Instance attribute holding the values a config was last validated with (not a dataclass field: OmegaConf,
#: asdict and == never see it).
_VALIDATED_AS = "_tltrain_validated_as"


def validate_once(config, check: Callable[[], None]) -> None:
    """check() unless config already passed it with exactly its current values.

    A run's config is validated once, when it is loaded (tltrain.config.RunConfig.validate); the loaders, the
    schedule builder and the trainer call validate() again because they are also used on their own. Those later
    calls cost nothing while the values are unchanged, and check again as soon as any of them changed (the repr
    of a config dataclass spells every field, nested ones included, and tells 1 from 1.0 and True)."""
    values = repr(config)
    if getattr(config, _VALIDATED_AS, None) == values:
        return
    check()
    object.__setattr__(config, _VALIDATED_AS, values)
