"""Eval reports: the results reach disk whatever the plot does (issue 27, item 8)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from iflybot_vla_policy.eval import report
from iflybot_vla_policy.eval.metrics import wilson_interval
from iflybot_vla_policy.eval.report import EpisodeResult, write_report


def _episodes(successes: int, total: int) -> list[EpisodeResult]:
    return [EpisodeResult(task='pick_place', seed=320 + i, instruction='pick',
                          success=i < successes, duration_s=3.0,
                          time_to_success_s=3.0 if i < successes else None)
            for i in range(total)]


@pytest.mark.parametrize('trials', range(1, 101))
def test_wilson_interval_always_contains_the_rate(trials: int) -> None:
    for successes in range(trials + 1):
        low, high = wilson_interval(successes, trials)
        assert 0.0 <= low <= successes / trials <= high <= 1.0


def test_a_perfect_score_is_reported_and_plotted(tmp_path: Path) -> None:
    doc = write_report(tmp_path, _episodes(10, 10), {'policy': 'test'})
    assert doc['overall']['success_ci95'][1] == 1.0
    assert json.loads((tmp_path / 'report.json').read_text())['overall']['successes'] == 10
    assert '![success per task](success.png)' in (tmp_path / 'report.md').read_text()
    assert (tmp_path / 'success.png').stat().st_size > 0


def test_a_failing_plot_keeps_report_json_and_report_md(tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    (tmp_path / 'success.png').write_bytes(b'a figure from an earlier run')

    def broken_plot(path: Path, summary: dict) -> bool:
        path.write_bytes(b'half a png')
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(report, '_plot_success', broken_plot)
    write_report(tmp_path, _episodes(7, 10), {'policy': 'test'})
    assert json.loads((tmp_path / 'report.json').read_text())['overall']['successes'] == 7
    text = (tmp_path / 'report.md').read_text()
    assert '| pick_place | 7/10 (70%)' in text and 'success.png' not in text
    assert not (tmp_path / 'success.png').exists()      # neither the stale nor the broken one
    assert "'yerr' must not contain negative values" in capsys.readouterr().err
