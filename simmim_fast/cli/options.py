"""Command-line options declared once: flag, YAML key, type, default, range or choices, path rule, help.

An :class:`Option` is the whole declaration of one option; a :class:`Command` is a CLI's table of them
(plus :class:`Rule` checks across options). From it come the argparse parser (``--help`` shows one
default per flag), the arguments dataclass (:meth:`Command.args_class`), the typing of YAML values
and every check: :meth:`Command.parse` reads flags and the ``--config`` file, types and checks what
was given; :meth:`Command.check` checks values resolved later (a preset's recipe, a resumed run's
settings) with the same rules. Adding a flag is adding one ``Option`` to a table in ``commands``.

Typing: a flag's text is converted (``int``, ``float``); a YAML value must already have the type
(``batch_size: "x"`` or ``data: 5`` are errors), except that a float option also takes a numeric
string (PyYAML reads ``1e-4``, without a dot, as a string). Floats must be finite. A bool option is
a flag (``store_true``); in YAML ``true``/``false``. Errors are :class:`UsageError`, one line each.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import read_config
from .errors import UsageError
from .paths import RULES as PATH_RULES
from .paths import path_problem

__all__ = ["UsageError", "Range", "Option", "Rule", "Command", "POSITIVE", "NON_NEGATIVE", "FRACTION",
           "RATE", "PROBABILITY"]


@dataclass(frozen=True)
class Range:
    """An interval of numbers; ``low_open``/``high_open`` exclude the bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return False
        return True

    def describe(self, noun: str) -> str:
        """``"a positive integer"``, ``"a finite number >= 0"``, ``"a number in (0, 1)"``, ..."""
        article = "an" if noun[0] in "aeiou" else "a"
        if self.high is None:
            if self.low is None:
                return f"{article} {noun}"
            if self.low == 0 and self.low_open:
                return f"a positive {noun}"
            return f"{article} {noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{article} {noun} {'<' if self.high_open else '<='} {self.high:g}"
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{article} {noun.replace('finite ', '')} in {lo}{self.low:g}, {self.high:g}{hi}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
RATE = Range(0, 1, high_open=True)  # [0, 1)
PROBABILITY = Range(0, 1)  # [0, 1]

_TYPES = (int, float, str, bool)


@dataclass(frozen=True)
class Option:
    """One option of a CLI. The flag is ``--`` + ``name`` with ``-`` for ``_``; the YAML key is ``name``.

    ``default``: the value when not given (None: derived later, e.g. from the preset's recipe, which
    ``default_help`` names in ``--help``). ``range``/``choices``/``check`` (a function returning what was
    expected when a value is wrong, else None) and ``path`` (a rule of ``cli.paths``, ``expect`` saying
    what the path should be) are checked for every value given or resolved. ``many``: one or more values;
    ``const``: the flag may stand alone and then means ``const`` (which no path rule applies to).
    ``resumed``: on ``--resume`` taken from the checkpoint unless given again (False for settings of the
    invocation or machine). ``in_config``: settable from the YAML ``--config``.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    default_help: str | None = None
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    what: str | None = None  # the noun of a choice in errors, e.g. "fine-tuning preset"
    check: Callable[[Any], str | None] | None = None
    path: str | None = None
    expect: str | None = None
    many: bool = False
    const: str | None = None
    required: bool = False
    resumed: bool = True
    in_config: bool = True

    def __post_init__(self):
        if self.type not in _TYPES:
            raise ValueError(f"Option {self.name}: type must be one of int, float, str, bool, got {self.type!r}")
        if self.path is not None and self.path not in PATH_RULES:
            raise ValueError(f"Option {self.name}: path must be one of {', '.join(PATH_RULES)}, got {self.path!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def help_text(self) -> str:
        text = self.help
        if self.required:
            suffix = "required"
        elif self.default_help is not None:
            suffix = f"default: {self.default_help}"
        elif self.default is not None and self.type is not bool:
            suffix = f"default: {self.default}"
        else:
            return text
        return f"{text} ({suffix})" if text else f"({suffix})"

    def metavar(self) -> str:
        if self.choices is not None:
            return "{" + ",".join(self.choices) + "}"
        if self.path is not None:
            return {"file": "FILE", "dir": "DIR", "out_dir": "DIR", "out_file": "FILE"}.get(self.path, "PATH")
        return {int: "N", float: "X"}.get(self.type, self.name.upper())

    # ---- typing and checks -------------------------------------------------------------------
    def _noun(self) -> str:
        return {int: "integer", float: "finite number", str: "string", bool: "true or false"}[self.type]

    def expected(self) -> str:
        """What a valid value is, as a phrase ("a positive integer", "one of l1, l2, smooth_l1", ...)."""
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        if self.path is not None:
            return "paths (strings)" if self.many else f"a path to {self.expect or 'a file or folder'}"
        if self.type is bool:
            return "true or false"
        if self.range is not None:
            return self.range.describe(self._noun())
        return {int: "an integer", float: "a finite number", str: "a string"}[self.type]

    def convert(self, raw, *, from_text: bool):
        """``raw`` (a flag's text, or a YAML/resolved value) as this option's type, or ``_Bad(expected)``
        (which the command turns into a :class:`UsageError` naming the flag or YAML key)."""
        if self.many:
            items = [raw] if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, str) for i in items):
                raise _Bad(f"one or more {self.expected()}")
            return list(items)
        if self.type is bool:
            if not isinstance(raw, bool):
                raise _Bad("true or false")
            return raw
        if self.type is str:
            if not isinstance(raw, str):
                raise _Bad(self.expected())
            return raw
        if self.type is int:
            if isinstance(raw, str) and from_text:
                try:
                    return int(raw)
                except ValueError:
                    raise _Bad(self.expected()) from None
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise _Bad(self.expected())
            return raw
        # float
        if isinstance(raw, str):  # a flag's text; in YAML, PyYAML's reading of 1e-4 (no dot) as a string
            try:
                return float(raw)
            except ValueError:
                raise _Bad(self.expected()) from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise _Bad(self.expected())
        return float(raw) if isinstance(raw, int) else raw

    def problem(self, value) -> str | None:
        """What is wrong with a typed ``value`` (a phrase naming what was expected), or None."""
        if value is None:
            return None
        if self.type is float and not math.isfinite(value):
            return f"expected {self.expected()}, got {value!r}"
        if self.range is not None and value not in self.range:
            return f"expected {self.expected()}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            if self.what:
                return f"unknown {self.what} {value!r}; expected one of {', '.join(self.choices)}"
            return f"expected one of {', '.join(self.choices)}, got {value!r}"
        if self.check is not None:
            want = self.check(value)
            if want is not None:
                return f"expected {want}, got {value!r}"
        if self.path is not None:
            for v in value if self.many else [value]:
                if self.const is not None and v == self.const:
                    continue
                bad = path_problem(self.path, v, expect=self.expect)
                if bad is not None:
                    return bad
        return None


class _Bad(Exception):
    def __init__(self, expected: str):
        self.expected = expected


@dataclass(frozen=True)
class Rule:
    """A check across options, run when all of ``names`` have values: ``holds(*values)`` must be true.

    ``message`` is formatted with the values by name and follows the flag of ``names[0]`` in the error.
    """

    names: tuple[str, ...]
    holds: Callable[..., bool]
    message: str


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line :class:`UsageError` s (exit code 2 through ``run_cli``)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Command:
    """A CLI's options and cross-option rules; ``config``: whether a YAML ``--config`` may set them."""

    prog: str
    description: str
    options: tuple[Option, ...]
    rules: tuple[Rule, ...] = ()
    config: bool = True
    epilog: str | None = None
    _by_name: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        by_name = {}
        for o in self.options:
            if o.name in by_name:
                raise ValueError(f"{self.prog}: option {o.name!r} declared twice")
            by_name[o.name] = o
        for r in self.rules:
            missing = [n for n in r.names if n not in by_name]
            if missing:
                raise ValueError(f"{self.prog}: rule on unknown options {missing}")
        object.__setattr__(self, "_by_name", by_name)

    def option(self, name: str) -> Option:
        return self._by_name[name]

    @property
    def not_resumed(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options if not o.resumed)

    def defaults(self) -> dict:
        return {o.name: (list(o.default) if o.many and o.default is not None else o.default) for o in self.options}

    # ---- argparse ----------------------------------------------------------------------------
    def build_parser(self) -> argparse.ArgumentParser:
        """Every flag with default None (so "given" is "not None"); values arrive as text and are typed
        and checked by :meth:`parse` (the same code as for YAML values)."""
        p = _Parser(prog=self.prog, description=self.description, epilog=self.epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if self.config:
            p.add_argument("--config", default=None, metavar="FILE",
                           help="YAML file setting any of these options (keys as the flags, - or _); "
                                "flags given here win over it")
        for o in self.options:
            kwargs: dict[str, Any] = {"default": None, "help": o.help_text()}
            if o.type is bool:
                kwargs["action"] = "store_true"
            else:
                kwargs["metavar"] = o.metavar()
                if o.many:
                    kwargs["nargs"] = "+"
                elif o.const is not None:
                    kwargs.update(nargs="?", const=o.const)
            p.add_argument(o.flag, **kwargs)
        p.add_argument("--debug", action="store_true", help="on an error, show its traceback too")
        return p

    # ---- reading and checking ----------------------------------------------------------------
    def parse(self, argv: Sequence[str] | None) -> dict:
        """The options given (YAML ``--config`` < flags), typed and checked: ``{name: value}``.

        Raises :class:`UsageError` naming the flag, or ``file:line: key`` for a YAML value. ``--help``
        exits (``SystemExit(0)``) after printing the help.
        """
        ns = vars(self.build_parser().parse_args(argv))
        ns.pop("debug", None)
        config = ns.pop("config", None)
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        if config is not None:
            bad = path_problem("file", config, expect="a YAML file")
            if bad:
                raise UsageError(f"--config: {bad}")
            known = [o.name for o in self.options if o.in_config]
            for name, (raw, line, key) in read_config(config, known).items():
                if raw is None:  # "key:" or "key: null": the default
                    continue
                label = f"{config}:{line}: {key}"
                values[name] = self._typed(self.option(name), raw, label, from_text=False)
                labels[name] = label
        for name, raw in ns.items():
            if raw is not None:
                o = self.option(name)
                values[name] = self._typed(o, raw, o.flag, from_text=True)
                labels[name] = o.flag
        self._check(values, labels)
        return values

    def check(self, values: dict, *, source: str | None = None) -> None:
        """Check resolved ``values`` (of these options; others are ignored) with the same rules as
        :meth:`parse`. ``source`` says where they came from, after the flag in errors."""
        labels, typed = {}, {}
        for name, v in values.items():
            if name in self._by_name and v is not None:
                o = self.option(name)
                labels[name] = o.flag + (f" ({source})" if source else "")
                typed[name] = self._typed(o, v, labels[name], from_text=False)
        self._check(typed, labels)

    def require(self, values: dict) -> None:
        """Every ``required`` option has a value."""
        for o in self.options:
            if o.required and values.get(o.name) is None:
                raise UsageError(f"{o.flag}: missing; expected {o.help}" if o.help else f"{o.flag}: missing")

    def args_class(self, name: str, *, module: str, doc: str) -> type:
        """A dataclass with one field per option (its default), e.g. ``TrainArgs``."""
        specs = []
        for o in self.options:
            ann: Any = list[str] if o.many else o.type
            if o.default is None:
                ann = ann | None
            specs.append((o.name, ann, dataclasses.field(default=o.default)))
        cls = dataclasses.make_dataclass(name, specs)
        cls.__module__, cls.__qualname__, cls.__doc__ = module, name, doc
        return cls

    # ---- internals ---------------------------------------------------------------------------
    @staticmethod
    def _typed(o: Option, raw, label: str, *, from_text: bool):
        try:
            return o.convert(raw, from_text=from_text)
        except _Bad as e:
            raise UsageError(_one_line(f"{label}: expected {e.expected}, got {raw!r}")) from None

    def _check(self, values: dict, labels: dict) -> None:
        for name, v in values.items():
            bad = self.option(name).problem(v)
            if bad is not None:
                raise UsageError(_one_line(f"{labels[name]}: {bad}"))
        for r in self.rules:
            if all(values.get(n) is not None for n in r.names):
                if not r.holds(*(values[n] for n in r.names)):
                    raise UsageError(_one_line(f"{labels[r.names[0]]}: {r.message.format(**values)}"))
