"""`iflybot bench --quick` runs every benchmark and writes one JSON plus a markdown table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from iflybot_vla_policy import bench_cmd, cli


def test_flatten_gives_dotted_keys_for_the_table() -> None:
    assert bench_cmd.flatten({'a': {'b': 1, 'c': {'d': 2.5}}, 'e': 'x'}) == [
        ('a.b', 1), ('a.c.d', 2.5), ('e', 'x')]


def test_unknown_benchmark_is_refused_with_the_available_ones(tmp_path: Path, capsys) -> None:
    assert cli.main(['bench', '--only', 'inferense', '--out', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) ['inferense']" in err and 'inference' in err


@pytest.mark.slow
def test_quick_bench_runs_every_benchmark(tmp_path: Path) -> None:
    assert cli.main(['bench', '--quick', '--out', str(tmp_path)]) == 0
    report = json.loads((tmp_path / 'bench.json').read_text())
    assert report['quick'] is True
    assert report['machine']['cores'] >= 1
    assert set(report['results']) == set(bench_cmd.discover())
    for name, result in report['results'].items():
        assert 'error' not in result, f'{name}: {result.get("error")}'
    table = (tmp_path / 'bench.md').read_text()
    for name in report['results']:
        assert f'## {name}' in table
