"""A strict stand-in for CuPy on a machine without a GPU: device arrays that hold numpy arrays.

It keeps what makes GPU code go wrong when it was only ever run on the CPU: a device array never turns into a
host array by itself (``np.asarray(device)`` raises, as with CuPy; ``.get()`` is the way back), and host
arrays cannot be mixed into device arithmetic (CuPy raises ``TypeError`` there too). Numpy functions called on
device arrays dispatch to the same functions on the device (``__array_function__``), as CuPy allows.

Install it with :func:`install` (a ``monkeypatch``): ``import cupy`` and ``import cupyx.scipy.fft`` then give
these modules, and ``cupy.cuda.runtime.getDeviceCount()`` reports one device.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import scipy.fft
from numpy.lib.mixins import NDArrayOperatorsMixin


class DeviceArray(NDArrayOperatorsMixin):
    """A numpy array "on the device"."""

    __module__ = "cupy"  # what code that tells CuPy arrays by their type's module sees (as for cupy.ndarray)

    def __init__(self, data: np.ndarray):
        self._data = data

    # --- the two ways across, and the refusals
    def get(self) -> np.ndarray:
        return self._data.copy()

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to a numpy array (use .get())")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(_to_host_checked(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*(_to_host_checked(x) for x in inputs), **kwargs)
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap_tree(args), **_unwrap_tree(kwargs)))

    # --- ndarray behaviour
    def __getitem__(self, key):
        return _wrap(self._data[_unwrap_tree(key)])

    def __setitem__(self, key, value):
        self._data[_unwrap_tree(key)] = _to_host_checked(value)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        raise TypeError("iterating over a device array (a host loop over device elements)")

    def __bool__(self):
        return bool(self._data)

    def __float__(self):
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ & co: numpy must not read the data behind our back
            raise AttributeError(name)
        attr = getattr(self._data, name)
        if callable(attr):
            return lambda *a, **k: _wrap(attr(*_unwrap_tree(a), **_unwrap_tree(k)))
        return _wrap(attr)

    def __repr__(self):
        return f"DeviceArray({self._data!r})"


def _to_host_checked(x):
    """The numpy array behind a device array; host arrays (not scalars) are refused, as CuPy does."""
    if isinstance(x, DeviceArray):
        return x._data
    if isinstance(x, np.ndarray) and x.ndim > 0:
        raise TypeError(f"a host numpy array {x.shape} mixed into device arithmetic")
    return x


def _unwrap_tree(x):
    if isinstance(x, DeviceArray):
        return x._data
    if isinstance(x, np.ndarray) and x.ndim > 0:
        raise TypeError(f"a host numpy array {x.shape} passed to a device function")
    if isinstance(x, tuple | list):
        return type(x)(_unwrap_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap_tree(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray | np.generic):  # reductions give 0-d device arrays, as in CuPy
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _module_function(name):
    func = getattr(np, name)

    def call(*args, **kwargs):
        return _wrap(func(*_unwrap_tree(args), **_unwrap_tree(kwargs)))

    return call


def _asarray(a, dtype=None):
    """Host -> device (the one explicit transfer), or a device array as it is."""
    if isinstance(a, DeviceArray):
        return DeviceArray(a._data.astype(dtype, copy=False) if dtype is not None else a._data)
    return DeviceArray(np.array(a, dtype=dtype))


def install(monkeypatch) -> types.ModuleType:
    """Put the fake ``cupy``, ``cupyx`` and ``cupyx.scipy.fft`` into ``sys.modules``; returns ``cupy``."""
    cupy = types.ModuleType("cupy")
    cupy.__getattr__ = lambda name: (getattr(np, name) if isinstance(getattr(np, name), type)
                                     or not callable(getattr(np, name)) else _module_function(name))
    cupy.asarray = _asarray
    # CuPy's take wraps out-of-bounds indices around (a documented difference from numpy, which raises).
    cupy.take = lambda a, indices, axis=None, out=None: _wrap(np.take(
        _unwrap_tree(a), _unwrap_tree(indices), axis=axis, mode="wrap",
        **({"out": _unwrap_tree(out)} if out is not None else {})))
    cupy.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
    cupy.ndarray = DeviceArray
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    fft = types.ModuleType("cupyx.scipy.fft")
    for name in ("dctn", "idctn", "fft", "ifft", "rfft", "irfft", "fftfreq", "rfftfreq", "fftn", "ifftn"):
        fft.__dict__[name] = (lambda f: lambda *a, **k: _wrap(f(*_unwrap_tree(a), **_unwrap_tree(k))))(
            getattr(scipy.fft, name))
    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy, cupyx_scipy.fft = cupyx_scipy, fft
    for name, module in (("cupy", cupy), ("cupyx", cupyx), ("cupyx.scipy", cupyx_scipy), ("cupyx.scipy.fft", fft)):
        monkeypatch.setitem(sys.modules, name, module)
    return cupy
