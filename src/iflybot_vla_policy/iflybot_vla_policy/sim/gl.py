"""Pick MuJoCo's headless OpenGL backend before `mujoco` is imported.

MuJoCo reads ``MUJOCO_GL`` once, at import time. A user's value always wins; otherwise EGL is used
when libEGL exposes at least one device (GPU or Mesa's software device), else OSMesa.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_VALID = ('egl', 'osmesa', 'glfw', 'glx', 'disable')


def _egl_has_device() -> bool:
    """True when libEGL loads and eglQueryDevicesEXT reports a device (no context is created)."""
    name = ctypes.util.find_library('EGL') or 'libEGL.so.1'
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return False
    get_proc = lib.eglGetProcAddress
    get_proc.restype = ctypes.c_void_p
    get_proc.argtypes = [ctypes.c_char_p]
    address = get_proc(b'eglQueryDevicesEXT')
    if not address:
        return False
    query = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_int))(address)
    count = ctypes.c_int(0)
    return bool(query(0, None, ctypes.byref(count))) and count.value > 0


def _osmesa_available() -> bool:
    return ctypes.util.find_library('OSMesa') is not None


def select_gl_backend() -> str:
    """Set ``MUJOCO_GL`` (and ``PYOPENGL_PLATFORM``) if unset; returns the backend in effect."""
    chosen = os.environ.get('MUJOCO_GL', '').strip().lower()
    if chosen:
        if chosen not in _VALID:
            raise ValueError(f'MUJOCO_GL={chosen!r} is not supported; choose from {_VALID}')
    elif 'mujoco' in sys.modules:
        return 'glfw'  # too late to choose: mujoco already picked its default
    elif _egl_has_device():
        chosen = 'egl'
    elif _osmesa_available():
        chosen = 'osmesa'
    else:
        chosen = 'egl'  # the error at render time then names the missing library
    os.environ['MUJOCO_GL'] = chosen
    if chosen in ('egl', 'osmesa'):
        os.environ.setdefault('PYOPENGL_PLATFORM', chosen)
    return chosen
