#!/usr/bin/env python3
"""The README's end-to-end table from a ``test_end_to_end.py`` run's ``--benchmark-json``.

    python benchmarks/results_table.py e2e.json                    # print the Markdown table
    python benchmarks/results_table.py e2e.json --readme README.md  # replace the table between the markers

The README block sits between ``<!-- e2e-table:start -->`` and ``<!-- e2e-table:end -->``; the rest of the
file is left as it is. ``pytest benchmarks/test_end_to_end.py`` prints the same table at the end of its
run (``benchmarks/conftest.py``). Imports no torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- e2e-table:start -->", "<!-- e2e-table:end -->"

#: rows collected by test_end_to_end.py in this process (printed by conftest's terminal summary)
E2E_ROWS: list = []

COLUMNS = ("preset", "variant", "img/s", "vs official", "vs compiled ref", "MFU", "peak GiB", "first step s",
           "compile s", "loss rel. diff")


def _f(x, digits: int = 3, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f} %"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def row_cells(r: dict) -> list[str]:
    if r.get("status") != "ok":
        return [r.get("preset", "?"), r.get("variant", "?"), f"skipped: {r.get('reason', '')}"] + ["-"] * 7
    return [r["preset"], r["variant"], _f(r.get("img_per_s"), 4), _f(r.get("speedup_vs_official_equiv")),
            _f(r.get("speedup_vs_official_equiv_compiled")), _f(r.get("mfu"), pct=True), _f(r.get("peak_memory_gib")),
            _f(r.get("first_step_s")), _f(r.get("compile_s")), _f(r.get("loss_rel_diff_vs_official"), 2)]


def markdown_table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (``test_end_to_end`` rows), with a header line saying where they ran."""
    if not rows:
        return "(no end-to-end rows)"
    ok = [r for r in rows if r.get("status") == "ok"]
    head = ok[0] if ok else rows[0]
    peak = head.get("peak_matmul") or {}
    lines = [f"Device: {head.get('device', '?')}, {head.get('precision', '?')}, batch {head.get('batch', '?')}, "
             f"median of {head.get('rounds', '?')} interleaved rounds of {head.get('steps_per_round', '?')} steps; "
             f"MFU against a measured {peak.get('dtype', '?')} {peak.get('n', '?')}^3 matmul "
             f"({_f(peak.get('tflops'))} TFLOP/s)" + ("; compiled rows: backend " + str(next(
                 (r['compile_backend'] for r in ok if r.get('compile_backend')), "-")) if ok else ""), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def rows_from_json(data: dict) -> list[dict]:
    """The ``test_end_to_end`` rows of a pytest-benchmark JSON document (its ``extra_info``)."""
    rows = []
    for b in data.get("benchmarks", []):
        if "test_end_to_end" not in b.get("fullname", b.get("name", "")):
            continue
        info = dict(b.get("extra_info") or {})
        if info:
            rows.append(info)
    return rows


def replace_block(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table`` (ValueError without the markers)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"--readme: expected one {START} ... {END} block")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="pytest-benchmark JSON of benchmarks/test_end_to_end.py")
    p.add_argument("--readme", help="Markdown file whose e2e-table block to replace")
    args = p.parse_args(argv)
    try:
        data = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as e:
        print(f"results_table: {args.json}: {e}", file=sys.stderr)
        return 2
    rows = rows_from_json(data)
    if not rows:
        print(f"results_table: {args.json} holds no test_end_to_end rows", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    if args.readme:
        path = Path(args.readme)
        try:
            path.write_text(replace_block(path.read_text(), table))
        except (OSError, ValueError) as e:
            print(f"results_table: {e}", file=sys.stderr)
            return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
