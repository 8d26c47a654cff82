"""SpaceMouse (3Dconnexion) input without drivers: HID reports from /dev/hidraw, or pyspacemouse.

Optional: `find_spacemouse()` returns None when no device is plugged in (or /dev/hidraw is not
readable), and the teleop node then runs on the keyboard alone. `pyspacemouse` is used when it is
importable (it is not a dependency of this project); otherwise the hidraw reports are parsed here.
"""
from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iflybot_vla_policy.teleop import TeleopConfig, clamp_norm

SPACEMOUSE_VENDORS = {0x046D, 0x256F}     # Logitech (3Dconnexion) and 3Dconnexion
SPACEMOUSE_FULL_SCALE = 350.0             # raw axis value at full deflection


@dataclass
class SpaceMouseState:
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # -1..1 per axis
    rotation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    buttons: int = 0


def parse_spacemouse_report(report: bytes, state: SpaceMouseState) -> SpaceMouseState:
    """Update `state` from one HID report of a 3Dconnexion device (hidraw).

    Report 1: translation x, y, z (int16 LE); newer devices append rotation in the same report
    (13 bytes). Report 2: rotation. Report 3: button bitmask. Device axes (x right, y towards
    the user, z down) are mapped to the base frame (x forward, y left, z up).
    """
    if not report:
        return state
    rid = report[0]
    if rid in (1, 2) and len(report) >= 7:
        axes = np.array(struct.unpack_from('<3h', report, 1), dtype=np.float64)
        axes = np.clip(axes / SPACEMOUSE_FULL_SCALE, -1.0, 1.0)
        mapped = np.array([-axes[1], -axes[0], -axes[2]])
        if rid == 1:
            state.translation = mapped
            if len(report) >= 13:
                rot = np.array(struct.unpack_from('<3h', report, 7), dtype=np.float64)
                rot = np.clip(rot / SPACEMOUSE_FULL_SCALE, -1.0, 1.0)
                state.rotation = np.array([-rot[1], -rot[0], -rot[2]])
        else:
            state.rotation = mapped
    elif rid == 3 and len(report) >= 2:
        state.buttons = report[1]
    return state


def spacemouse_twist(state: SpaceMouseState, config: TeleopConfig, scale: float = 1.0,
                     deadband: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Deflection -> (linear (3,) m/s, angular (3,) rad/s), with a deadband around zero."""
    t = np.where(np.abs(state.translation) < deadband, 0.0, state.translation)
    r = np.where(np.abs(state.rotation) < deadband, 0.0, state.rotation)
    return (clamp_norm(t * config.linear_speed * scale * 2, config.max_linear_speed),
            clamp_norm(r * config.angular_speed * scale * 2, config.max_angular_speed))


def find_spacemouse(sys_root: Path = Path('/sys/class/hidraw')) -> Path | None:
    """The /dev/hidrawN of the first 3Dconnexion device, or None."""
    if not sys_root.is_dir():
        return None
    for entry in sorted(sys_root.iterdir()):
        uevent = entry / 'device' / 'uevent'
        try:
            text = uevent.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith('HID_ID='):
                parts = line.split('=', 1)[1].split(':')
                if len(parts) == 3 and int(parts[1], 16) in SPACEMOUSE_VENDORS:
                    dev = Path('/dev') / entry.name
                    if os.access(dev, os.R_OK):
                        return dev
    return None


class SpaceMouseReader:
    """Reads a device on a daemon thread; `state` always holds the latest deflection."""

    def __init__(self, device: Path | None = None) -> None:
        self.state = SpaceMouseState()
        self.source = ''
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pyspacemouse  # optional, import-guarded
        except ImportError:
            pyspacemouse = None
        if pyspacemouse is not None and pyspacemouse.open():
            self._pyspacemouse = pyspacemouse
            self.source = 'pyspacemouse'
            self._thread = threading.Thread(target=self._run_pyspacemouse, daemon=True)
        else:
            device = device or find_spacemouse()
            if device is None:
                return
            self._fd = os.open(device, os.O_RDONLY)
            self.source = str(device)
            self._thread = threading.Thread(target=self._run_hidraw, daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._thread is not None

    def _run_hidraw(self) -> None:
        while not self._stop.is_set():
            try:
                report = os.read(self._fd, 64)
            except OSError:
                return
            parse_spacemouse_report(report, self.state)

    def _run_pyspacemouse(self) -> None:
        while not self._stop.is_set():
            s = self._pyspacemouse.read()
            self.state.translation = np.array([s.y, -s.x, s.z], dtype=np.float64)
            self.state.rotation = np.array([s.roll, s.pitch, -s.yaw], dtype=np.float64)
            self.state.buttons = int(sum(b << i for i, b in enumerate(s.buttons)))

    def close(self) -> None:
        self._stop.set()
        if getattr(self, '_fd', None) is not None:
            os.close(self._fd)
            self._fd = None
