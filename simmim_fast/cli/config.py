"""YAML ``--config`` files of the CLIs, read as data: ``{key: (value, line)}`` or one ``file:line:`` error.

Keys mirror the flags (``-`` or ``_``); an unknown or repeated key, a document that is not a mapping, a
syntax error (yaml's ``problem_mark``) and a Python object tag (``!!python/...``: refused, never built)
are :class:`~simmim_fast.cli.options.UsageError` naming the file and line. Values are parsed with
``yaml.safe_load``; the line numbers come from ``yaml.compose`` (nodes only, nothing is constructed).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import yaml

from .errors import UsageError


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_error(path: str, e: yaml.YAMLError) -> UsageError:
    problem = getattr(e, "problem", None)
    mark, context_mark = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    if context_mark is not None and (mark is None or "<stream end>" in (problem or "")):
        mark = context_mark  # an unclosed [ or {: the line where it opened, not the end of the file
    where = f"{path}:{mark.line + 1}" if mark is not None else path
    if isinstance(e, yaml.constructor.ConstructorError) and problem and "python/" in problem:
        tag = problem.split("tag ", 1)[-1].strip(" '\"")
        return UsageError(f"{where}: a Python object tag ({tag}) is refused: a config file holds plain values "
                          f"(numbers, strings, true/false, lists)")
    if problem:
        context = getattr(e, "context", None)
        return UsageError(_one_line(f"{where}: {problem}" + (f" ({context})" if context else "")))
    return UsageError(_one_line(f"{where}: not a readable YAML file: {e}"))


def read_config(path: str, known: Iterable[str]) -> dict[str, tuple[object, int, str]]:
    """``{field: (value, line, key as written)}`` of a YAML mapping whose keys are in ``known``.

    ``known``: field names (``_`` spelling); a key may use ``-`` instead. A null value is returned as
    None (the CLIs take it as "the default").
    """
    known = set(known)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist (expected a YAML file)") from None
    except IsADirectoryError:
        raise UsageError(f"--config: {path} is a folder (expected a YAML file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(_one_line(f"--config: cannot read {path}: {e}")) from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise UsageError(f"{path}:{line}: expected a mapping of option: value at the top level, "
                         f"got a {type(data).__name__}")
    out: dict[str, tuple[object, int, str]] = {}
    for key_node, _ in root.value:  # one entry per key as written, in order, with its line
        key, line = key_node.value, key_node.start_mark.line + 1
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"{path}:{line}: unknown key {key!r}; {hint}known keys: {', '.join(sorted(known))}")
        if name in out:
            raise UsageError(f"{path}:{line}: key {key!r} given twice (first at line {out[name][1]})")
        out[name] = (None, line, str(key))
    for k, v in data.items():  # the constructed values (safe_load), matched to their keys
        name = str(k).replace("-", "_")
        _, line, key = out[name]
        out[name] = (v, line, key)
    return out
