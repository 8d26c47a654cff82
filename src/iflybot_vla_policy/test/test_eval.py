"""`iflybot eval` writes well-formed reports; the scripted expert validates the harness."""
from __future__ import annotations

import json
import math
from pathlib import Path

from iflybot_vla_policy import cli


def test_tiny_random_policy_gives_a_well_formed_report(tmp_path: Path) -> None:
    rc = cli.main(['eval', '--preset', 'tiny', '--tasks', 'pick_place', '--episodes', '2',
                   '--max-time', '1', '--image-size', '64', '--videos', '1',
                   '--out', str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    row = report['tasks']['pick_place']
    assert row['episodes'] == 2
    assert 0.0 <= row['success_rate'] <= 1.0
    low, high = row['success_ci95']
    assert 0.0 <= low <= row['success_rate'] <= high <= 1.0
    assert row['inference_latency_ms_p50'] > 0.0
    assert math.isfinite(row['inference_latency_ms_p99'])
    # A random policy proposes wild chunks: the safety filter holds instead of sending them.
    assert row['limit_violations']['position'] == 0
    assert row['limit_violations']['velocity'] == 0
    assert len(report['episodes']) == 2
    for episode in report['episodes']:     # every hold is explained
        assert sum(episode['hold_reasons'].values()) == \
            episode['limit_violations']['safety_holds']
    assert {e['seed'] for e in report['episodes']} == {1_000_000, 1_000_001}
    assert (tmp_path / 'report.md').read_text().startswith('# Closed-loop evaluation')
    video = tmp_path / report['episodes'][0]['video']
    assert video.suffix == '.mp4' and video.stat().st_size > 1000


def test_scripted_expert_as_policy_scores_at_least_95_percent(tmp_path: Path) -> None:
    rc = cli.main(['eval', '--expert', '--tasks', 'pick_place,stack,push,drawer',
                   '--episodes', '2', '--videos', '0', '--out', str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['overall']['episodes'] == 8
    assert report['overall']['success_rate'] >= 0.95
    for task in ('pick_place', 'stack', 'push', 'drawer'):
        assert report['tasks'][task]['limit_violations']['position'] == 0
    # the expert closes on the cube it was told to pick, centred to well under a centimetre
    for task in ('pick_place', 'stack'):
        assert report['tasks'][task]['grasp_attempts'] == 2
        assert report['tasks'][task]['grasp_xy_error_m_median'] < 0.01
    assert report['tasks']['push']['grasp_attempts'] == 0
    rows = (tmp_path / 'report.md').read_text().splitlines()
    assert any('grasp offset (cm)' in row for row in rows)
    # push has no grasp: its offset is not measured, rather than "never closed"
    assert all('not measured' in row for row in rows if row.startswith('| push | 1'))
    assert not any('never closed' in row for row in rows if row.startswith('| pick_place | 1'))


def test_scripted_expert_succeeds_when_the_loop_replans_every_few_actions() -> None:
    """The expert plans a whole chunk per call; a 16-action plan cut after 4 ran ahead of the
    arm and failed every episode (the harness looked broken with --replan-steps)."""
    from iflybot_vla_policy.eval.rollout import (
        ExpertPolicy,
        RolloutConfig,
        eval_seeds,
        run_episode,
    )
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.safety import SafetyFilter

    safety = SafetyFilter(load_robot())
    expert = ExpertPolicy(horizon=16, dt=0.1)
    for seed in eval_seeds(2):
        result = run_episode(expert, 'pick_place', seed, RolloutConfig(replan_steps=4), safety)
        assert result.success, seed


def test_eval_is_deterministic_given_the_seeds(tmp_path: Path) -> None:
    outcomes = []
    for run in ('a', 'b'):
        out = tmp_path / run
        assert cli.main(['eval', '--expert', '--tasks', 'push', '--episodes', '1',
                         '--videos', '0', '--out', str(out)]) == 0
        episode = json.loads((out / 'report.json').read_text())['episodes'][0]
        outcomes.append((episode['success'], episode['duration_s'], episode['rms_jerk']))
    assert outcomes[0] == outcomes[1]


def test_unknown_task_is_refused_with_the_choices(tmp_path: Path, capsys) -> None:
    assert cli.main(['eval', '--expert', '--tasks', 'pick_and_place', '--out',
                     str(tmp_path)]) == 2
    assert "unknown task(s) ['pick_and_place']" in capsys.readouterr().err


def test_instruction_variants_run_the_same_scenes_and_bad_ones_are_refused(
        tmp_path: Path, capsys) -> None:
    assert cli.main(['eval', '--expert', '--tasks', 'pick_place,stack', '--episodes', '1',
                     '--instruction-variant', '2', '--out', str(tmp_path)]) == 2
    assert 'out of range for pick_place (0..1)' in capsys.readouterr().err
    runs = {}
    for variant in (0, 1):
        out = tmp_path / f'v{variant}'
        assert cli.main(['eval', '--expert', '--tasks', 'pick_place', '--episodes', '1',
                         '--instruction-variant', str(variant), '--videos', '0',
                         '--out', str(out)]) == 0
        report = json.loads((out / 'report.json').read_text())
        assert report['meta']['instruction_variant'] == variant
        runs[variant] = report['episodes'][0]
    assert runs[0]['seed'] == runs[1]['seed'] and runs[1]['success']
    assert runs[0]['instruction'] != runs[1]['instruction']


def test_safety_holds_are_reported_apart_from_limit_violations(tmp_path: Path) -> None:
    from iflybot_vla_policy.eval.report import EpisodeResult, hold_category, write_report

    episode = EpisodeResult(task='push', seed=1, instruction='push', success=False,
                            duration_s=1.0, time_to_success_s=None, inference_ms=[10.0],
                            limit_violations={'position': 0, 'velocity': 0, 'non_finite': 0,
                                              'safety_holds': 3},
                            hold_reasons={hold_category(
                                'action 0 puts the TCP 0.004 m outside the workspace box'): 3})
    write_report(tmp_path, [episode], {'policy': 'test'})
    text = (tmp_path / 'report.md').read_text()
    row = [line for line in text.splitlines() if line.startswith('| push |')][0]
    assert row.rstrip().endswith('| 0 | 3 | 0 (0) |')   # violations, holds, reflexes
    assert '| action N puts the TCP N m outside the workspace box | 3 |' in text


def test_expert_noise_perturbs_the_arm_joints_per_chunk_or_per_action() -> None:
    import numpy as np
    import pytest

    from iflybot_vla_policy.eval.rollout import ExpertPolicy

    chunk = np.tile(np.arange(8, dtype=np.float64), (16, 1))           # (horizon, 8)
    assert np.array_equal(ExpertPolicy().perturb(chunk), chunk)
    offset = ExpertPolicy(noise=0.02, noise_kind='offset').perturb(chunk) - chunk
    assert np.allclose(offset, offset[0]) and np.abs(offset[0, :7]).max() > 0
    assert np.all(offset[:, 7] == 0)                                   # gripper untouched
    jitter = ExpertPolicy(noise=0.02, noise_kind='iid').perturb(chunk) - chunk
    assert not np.allclose(jitter, jitter[0]) and np.all(jitter[:, 7] == 0)
    assert 0.01 < jitter[:, :7].std() < 0.03
    with pytest.raises(ValueError, match='noise_kind'):
        ExpertPolicy(noise=0.01, noise_kind='gauss')


def test_expert_noise_without_the_expert_is_refused(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(SystemExit, match='add --expert'):
        cli.main(['eval', '--preset', 'tiny', '--expert-noise', '0.01', '--episodes', '1',
                  '--out', str(tmp_path)])
