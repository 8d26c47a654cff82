"""Where the project's data files live, in a source checkout and in an installed workspace."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = 'iflybot_vla_policy'
_HERE = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The repository root when running from a source checkout (or a symlink install of it)."""
    candidate = _HERE.parent.parent.parent
    if (candidate / 'config').is_dir() and (candidate / 'src').is_dir():
        return candidate
    return None


def config_dir() -> Path:
    """Directory of the YAML presets (`config/`): $IFLYBOT_CONFIG_DIR, the checkout, or share/."""
    override = os.environ.get('IFLYBOT_CONFIG_DIR')
    if override:
        return Path(override)
    root = repo_root()
    if root is not None:
        return root / 'config'
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        share = Path(prefix) / 'share' / PACKAGE / 'config'
        if share.is_dir():
            return share
    raise FileNotFoundError(
        'cannot find the config/ directory: set IFLYBOT_CONFIG_DIR or source env.sh')


def checkpoints_dir() -> Path:
    """Directory of checkpoints bundled with the project (`checkpoints/` in the checkout)."""
    override = os.environ.get('IFLYBOT_CHECKPOINTS_DIR')
    if override:
        return Path(override)
    root = repo_root()
    return (root if root is not None else Path.cwd()) / 'checkpoints'
