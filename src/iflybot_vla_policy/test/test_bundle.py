"""bundle.yaml: what a bundled policy was trained on and how demo, eval and serve run it."""
from __future__ import annotations

from pathlib import Path

import pytest

from iflybot_vla_policy.bundle import bundle_info, evaluation_summary, noise_scale


def test_bundle_gives_the_trained_tasks_and_camera_size(tmp_path: Path) -> None:
    (tmp_path / 'bundle.yaml').write_text(
        'tasks: [pick_place]\ncamera: {width: 128, height: 128}\n')
    info = bundle_info(tmp_path)
    assert info['tasks'] == ['pick_place'] and info['camera'] == {'width': 128, 'height': 128}


def test_no_bundle_file_means_no_constraints(tmp_path: Path) -> None:
    assert bundle_info(tmp_path) == {} and bundle_info(None) == {}


def test_a_malformed_camera_entry_names_the_file(tmp_path: Path) -> None:
    (tmp_path / 'bundle.yaml').write_text('camera: {w: 128}\n')
    with pytest.raises(ValueError, match='bundle.yaml: camera must be'):
        bundle_info(tmp_path)


def test_the_bundled_evaluation_is_summarised_per_task(tmp_path: Path) -> None:
    (tmp_path / 'bundle.yaml').write_text(
        'evaluation: {pick_place: {successes: 11, episodes: 50}, stack: {successes: 0, '
        'episodes: 20}}\n')
    assert evaluation_summary(bundle_info(tmp_path)) == 'pick_place 11/50 (22%), stack 0/20 (0%)'


@pytest.mark.parametrize('entry', ['{successes: 51, episodes: 50}', '{successes: 3}',
                                   '{successes: 0, episodes: 0}', '0.22'])
def test_an_impossible_evaluation_names_the_task(tmp_path: Path, entry: str) -> None:
    (tmp_path / 'bundle.yaml').write_text(f'evaluation: {{pick_place: {entry}}}\n')
    with pytest.raises(ValueError, match='evaluation.pick_place must be'):
        bundle_info(tmp_path)


@pytest.mark.parametrize('text, message', [
    ('inference: {noise_scale: 1.5}\n', 'inference.noise_scale must be a number in'),
    ('inference: {noise_scale: off}\n', 'inference.noise_scale must be a number in'),
    ('inference: {noise: 0.0}\n', 'inference must be a mapping with keys'),
    ('evaluaton: {}\n', "unknown key\\(s\\) \\['evaluaton'\\]")])
def test_a_bad_bundle_key_is_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / 'bundle.yaml').write_text(text)
    with pytest.raises(ValueError, match=message):
        bundle_info(tmp_path)


def test_noise_scale_is_the_request_else_the_bundle_else_sampling(tmp_path: Path) -> None:
    assert noise_scale(tmp_path) == 1.0 and noise_scale(None) == 1.0
    (tmp_path / 'bundle.yaml').write_text('inference: {noise_scale: 0.0}\n')
    assert noise_scale(tmp_path) == 0.0
    assert noise_scale(tmp_path, 0.5) == 0.5 and noise_scale(tmp_path, 1.0) == 1.0


def _eval_args(*argv: str):
    import argparse

    from iflybot_vla_policy import eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    return eval_cmd, parser.parse_args(list(argv))


def test_eval_renders_the_camera_size_a_bundled_checkpoint_was_trained_on(tmp_path: Path) -> None:
    (tmp_path / 'bundle.yaml').write_text('camera: {width: 128, height: 128}\n')
    eval_cmd, args = _eval_args('--checkpoint', str(tmp_path))
    assert eval_cmd.camera_size(args) == 128
    eval_cmd, args = _eval_args('--checkpoint', str(tmp_path), '--image-size', '96')
    assert eval_cmd.camera_size(args) == 96
    eval_cmd, args = _eval_args('--checkpoint', str(tmp_path / 'elsewhere'))
    assert eval_cmd.camera_size(args) == 224
    eval_cmd, args = _eval_args('--expert')
    assert eval_cmd.camera_size(args) == 224


def test_through_ros_eval_renders_the_same_camera_size_as_the_direct_eval(tmp_path: Path) -> None:
    # It rendered the simulator's default 320x240 for a policy trained on 128x128 frames.
    (tmp_path / 'bundle.yaml').write_text('camera: {width: 128, height: 128}\n')
    eval_cmd, args = _eval_args('--through-ros', '--checkpoint', str(tmp_path))
    overrides, name = eval_cmd.through_ros_graph(args)
    assert overrides == [f'checkpoint:={tmp_path.resolve()}', 'image_width:=128',
                         'image_height:=128'] and name == str(tmp_path)
    eval_cmd, args = _eval_args('--through-ros', '--preset', 'tiny', '--image-size', '96',
                                '--policy-threads', '1')
    assert eval_cmd.through_ros_graph(args)[0] == ['preset:=tiny', 'image_width:=96',
                                                   'image_height:=96', 'policy_threads:=1']


def test_eval_and_its_through_ros_graph_take_the_bundle_noise_scale_unless_told(
        tmp_path: Path) -> None:
    # The bundled policy was evaluated deterministically, but the CLIs sampled (noise 1).
    (tmp_path / 'bundle.yaml').write_text('inference: {noise_scale: 0.0}\n')
    eval_cmd, args = _eval_args('--checkpoint', str(tmp_path))
    assert eval_cmd._noise_scale(args) == 0.0
    assert not any(o.startswith('noise_scale') for o in eval_cmd.through_ros_graph(args)[0])
    eval_cmd, args = _eval_args('--through-ros', '--checkpoint', str(tmp_path),
                                '--noise-scale', '1')
    assert eval_cmd._noise_scale(args) == 1.0
    assert eval_cmd.through_ros_graph(args)[0][-1] == 'noise_scale:=1.0'
    eval_cmd, args = _eval_args('--expert')
    assert eval_cmd._noise_scale(args) is None


def test_eval_names_a_bad_bundle_instead_of_a_traceback(tmp_path: Path, capsys) -> None:
    from iflybot_vla_policy import cli

    (tmp_path / 'bundle.yaml').write_text('inference: {noise_scale: 2}\n')
    assert cli.main(['eval', '--checkpoint', str(tmp_path), '--episodes', '1',
                     '--out', str(tmp_path / 'out')]) == 2
    assert 'bundle.yaml: inference.noise_scale must be' in capsys.readouterr().err
