"""`iflybot demo` reads what a bundled policy was trained on from its bundle.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest

from iflybot_vla_policy.demo_cmd import bundle_info


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
