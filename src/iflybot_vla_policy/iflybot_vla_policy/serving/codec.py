"""Wire format of openpi's websocket protocol: msgpack with numpy arrays as tagged maps.

openpi-client's ``msgpack_numpy`` encodes an array as ``{b'__ndarray__': True, b'data': <C-order
bytes>, b'dtype': <dtype.str>, b'shape': [...]}`` and a numpy scalar as ``{b'__npgeneric__':
True, b'data': <python value>, b'dtype': <dtype.str>}`` (bytes keys, so they cannot collide with
the str keys of user dicts). We write the same bytes, so openpi clients and servers interoperate
with ours, but decode defensively: whatever arrives comes from the network.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# Object arrays would need pickle, void/structured ones carry no portable layout: openpi refuses
# them when packing and so do we, in both directions.
_REFUSED_KINDS = frozenset('OV')


class DecodeError(ValueError):
    """A message that is not valid msgpack-numpy (malformed bytes, bad array header)."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind in _REFUSED_KINDS or obj.dtype.kind == 'c':
            raise TypeError(f'cannot encode numpy dtype {obj.dtype} (object, void and complex '
                            'arrays are not part of the openpi wire format)')
        if isinstance(obj, np.ndarray):
            return {b'__ndarray__': True, b'data': np.ascontiguousarray(obj).tobytes(),
                    b'dtype': obj.dtype.str, b'shape': list(obj.shape)}
        return {b'__npgeneric__': True, b'data': obj.item(), b'dtype': obj.dtype.str}
    raise TypeError(f'cannot encode object of type {type(obj).__name__}')


def _dtype(value: Any) -> np.dtype:
    if not isinstance(value, str):
        raise DecodeError(f'array dtype must be a string, got {type(value).__name__}')
    try:
        dtype = np.dtype(value)
    except TypeError as exc:
        raise DecodeError(f'unknown array dtype {value!r}') from exc
    if dtype.kind in _REFUSED_KINDS:
        raise DecodeError(f'refused array dtype {value!r} (object/void)')
    return dtype


def _decode_hook(obj: dict) -> Any:
    if b'__ndarray__' in obj:
        dtype = _dtype(obj.get(b'dtype'))
        data, shape = obj.get(b'data'), obj.get(b'shape')
        if not isinstance(data, bytes):
            raise DecodeError('array data must be bytes')
        if (not isinstance(shape, (list, tuple))
                or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise DecodeError(f'array shape must be a list of non-negative ints, got {shape!r}')
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != len(data):
            raise DecodeError(f'array of shape {list(shape)} and dtype {dtype.str} needs '
                              f'{count * dtype.itemsize} bytes, got {len(data)}')
        # A copy: the receive buffer is immutable, and consumers (torch) want writable arrays.
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()
    if b'__npgeneric__' in obj:
        dtype = _dtype(obj.get(b'dtype'))
        try:
            return dtype.type(obj.get(b'data'))
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f'bad numpy scalar of dtype {dtype.str}: {exc}') from exc
    return obj


def pack(obj: Any) -> bytes:
    """Encode nested dicts/lists of numbers, strings, bytes and numpy values; TypeError if not."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode one message; DecodeError names what is wrong (never another exception type)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError(f'not a msgpack message: {type(exc).__name__}: {exc}') from exc
