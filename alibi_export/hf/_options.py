"""Reading config.json fields: typed, with one-line errors that name the field."""
from __future__ import annotations

from ..errors import ConfigError

__all__ = ["field", "refuse", "refuse_unless", "not_alibi"]

_MISSING = object()


def field(data: dict, name: str, kind, default=_MISSING):
    """``data[name]`` checked to be ``kind`` (int accepts no bool; float accepts int); ``default`` if absent or null."""
    value = data.get(name)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"config.json has no {name!r}")
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        raise ConfigError(f"config.json field {name!r} has the wrong type: {value!r}")
    return value


def refuse(option: str, value, expected) -> None:
    """One line naming an option whose value this exporter does not implement."""
    raise ConfigError(f"config option {option}={value!r} is not implemented. Note: expected {expected}; exporting "
                      "anyway would give a different model")


def refuse_unless(data: dict, name: str, allowed: tuple, prefix: str = "") -> None:
    """Refuse ``data[name]`` unless it is absent or one of ``allowed``."""
    value = data.get(name)
    if value is not None and value not in allowed:
        refuse(prefix + name, value, " or ".join(repr(a) for a in allowed))


def not_alibi(model_type: str, why: str) -> None:
    raise ConfigError(f"this {model_type} config is not an ALiBi model ({why}). Note: alibi-export exports "
                      "ALiBi models only")
