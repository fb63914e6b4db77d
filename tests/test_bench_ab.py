"""bench/ab.py: budgetd builds against each other in interleaved rounds."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import ab  # noqa: E402
from bench.services import FloorProcess  # noqa: E402
from bench.stats import Result  # noqa: E402


def git(directory: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True
    ).stdout


def served(name: str, rps: list[float], loop: list[float | None]) -> ab.Served:
    each = ab.Served(name, FloorProcess(Path("/nonexistent")))
    each.results = [Result("h2load", 8.0, ok=int(value * 8), rps=value) for value in rps]
    each.loop_us = loop
    return each


def test_each_source_is_compared_round_by_round_with_the_first() -> None:
    summaries = ab.summarise(
        [
            served("0:main", [1000.0, 800.0, 900.0], [150.0, 160.0, 155.0]),
            served("1:.", [1100.0, 780.0, 990.0], [140.0, None, 150.0]),
        ]
    )
    reference, change = summaries
    assert reference.ratios == (1.0, 1.0, 1.0)
    assert change.ratios == pytest.approx((1.1, 0.975, 1.1))
    assert change.median_ratio == pytest.approx(1.1)
    assert change.faster_rounds == 2
    assert change.median_rps == 990.0
    assert change.median_loop_us == 145.0  # a round without a loop figure is left out
    table = ab.report(summaries).splitlines()
    assert table[0].split()[:3] == ["source", "req/s", "loop"]
    assert table[2].split()[:4] == ["1:.", "990", "145", "1.100"]
    assert "(2/3 faster: 1.100 0.975 1.100)" in table[2]


def test_one_source_or_only_floors_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ab.parse_args(["."])
    assert "at least two sources" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab.parse_args(["floor", "floor"])
    assert "at least one budgetd source" in capsys.readouterr().err


def test_sources_are_this_checkout_a_directory_or_a_revision(tmp_path: Path) -> None:
    trees = tmp_path / "trees"
    trees.mkdir()
    with contextlib.ExitStack() as stack:
        assert ab.source_tree(".", trees, stack) == ROOT
        assert ab.source_tree(str(ROOT), trees, stack) == ROOT
        tree = ab.source_tree("HEAD", trees, stack)
        assert (tree / "server" / "cli.py").is_file()
        assert git(tree, "rev-parse", "HEAD") == git(ROOT, "rev-parse", "HEAD")
    assert not tree.exists()  # the worktree is removed with the run
    assert str(tree) not in git(ROOT, "worktree", "list")
    with contextlib.ExitStack() as stack, pytest.raises(SystemExit, match="no-such-revision"):
        ab.source_tree("no-such-revision", trees, stack)


@pytest.mark.parametrize("path", ab.PATHS)
def test_a_short_run_measures_every_source(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The floor and this checkout, one round of one second each, on each path."""
    argv = ["--path", path, "--rounds", "1", "--seconds", "1", "--warmup", "0", "floor", "."]
    assert ab.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"0:floor", "1:."}
    assert float(rows["0:floor"][1]) > 0 and float(rows["1:."][1]) > 0
    assert float(rows["0:floor"][3]) == 1.0
