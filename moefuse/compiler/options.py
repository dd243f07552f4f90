"""The backend's options: one typed object, validated on entry, read at call time (never at import).

    torch.compile(model, backend="moefuse", options={"inner": "eager"})

Each field may also be set by its environment variable; an explicit option wins over the environment.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from moefuse.errors import OptionsError
from moefuse.rounding import check_tile_m

Inner = Literal["inductor", "eager"]
TokenRounding = Literal["off", "up", "down", "nearest"]


@dataclass(frozen=True)
class Options:
    inner: Inner = "inductor"
    """Compiler for the rest of the graph: "inductor" (default) or "eager" (fast compiles, for debugging and
    tests). Environment: MOEFUSE_INNER."""

    verify: bool = True
    """Check every region before rewriting it: run the captured region and the fused op on random inputs
    at the captured shapes (uniform and skewed routing) and reject the region if they disagree. Costs one
    run of the layer at compile time. Environment: MOEFUSE_VERIFY=0 turns it off."""

    lower: bool = True
    """Rewrite detected regions. False runs detection and the report only. Environment: MOEFUSE_LOWER=0."""

    token_rounding: TokenRounding = "off"
    """SonicMoE's token rounding (`moefuse.rounding`): round every expert's token count to a multiple of
    `tile_m`, "up", "down" or to the "nearest" multiple (ties up), so no GEMM tile is partly empty. It changes
    the routing, hence the outputs: meant for training (evaluate with "off", exact top-K, the default); the
    report marks every layer lowered with it. Environment: MOEFUSE_TOKEN_ROUNDING."""

    tile_m: int = 128
    """Rows per GEMM tile that token rounding rounds to: a power of two ≥ 16. Environment: MOEFUSE_TILE_M."""

    def __post_init__(self):
        check_tile_m(self.tile_m)


_ENV = {"inner": "MOEFUSE_INNER", "verify": "MOEFUSE_VERIFY", "lower": "MOEFUSE_LOWER",
        "token_rounding": "MOEFUSE_TOKEN_ROUNDING", "tile_m": "MOEFUSE_TILE_M"}


def _coerce(name: str, value, typ):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise OptionsError(f"option {name!r} takes a bool, got {value!r}")
    if typ is int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(f"option {name!r} takes an int, got {value!r}")
        if name.startswith("tile_m"):
            try:
                return check_tile_m(value)
            except OptionsError as e:
                raise OptionsError(f"option {name!r}: {e}") from None
        return value
    allowed = typing.get_args(typ)
    if value not in allowed:
        raise OptionsError(f"option {name!r} takes one of {list(allowed)}, got {value!r}")
    return value


def parse_options(options: dict | Options | None) -> Options:
    """Validate user options (dict or Options), filling unset fields from the environment."""
    if isinstance(options, Options):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise OptionsError(f"options must be a dict such as {{'inner': 'eager'}} (or an Options), got "
                           f"{type(options).__name__} {options!r}")
    options = dict(options or {})
    hints = typing.get_type_hints(Options)
    names = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise OptionsError(f"unknown moefuse option(s) {unknown}; valid options are {names}")
    values = {}
    for name in names:
        if name in options:
            values[name] = _coerce(name, options[name], hints[name])
        elif os.environ.get(_ENV[name]) is not None:
            values[name] = _coerce(f"{name} (from ${_ENV[name]})", os.environ[_ENV[name]], hints[name])
    return Options(**values)
