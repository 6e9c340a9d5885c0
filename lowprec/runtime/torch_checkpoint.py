"""Read ``torch.save()`` zip checkpoints (state dicts) without torch.

A restricted unpickler: tensors are rebuilt as NumPy arrays from the storage
files inside the zip, ``collections.OrderedDict`` is allowed, and every other
global raises :class:`pickle.UnpicklingError` before anything is called, so
nothing in the file is ever executed.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "ByteStorage": np.uint8,
    "CharStorage": np.int8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=None, *args):
    size, stride = tuple(size), tuple(stride)
    ints = all(
        isinstance(v, int) and not isinstance(v, bool) for v in (offset, *size, *stride)
    )
    # negative sizes or strides would put the view's elements before offset
    # (as_strided reads outside the buffer): refused, as torch.save never
    # writes them
    ok = ints and len(size) == len(stride) and min((*size, *stride), default=0) >= 0
    n = (
        1 + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if ok and all(size)
        else 0
    )
    ok = ok and isinstance(storage, np.ndarray) and storage.ndim == 1
    # stride-0 (expanded) views may hold more elements than their storage, but
    # not without bound: a (2**17, 2**17) view of one float would copy 64 GiB
    count = int(np.prod(size, dtype=np.float64)) if ok else 0
    ok = ok and count <= 1024 * max(storage.size, 1)
    if not ok or offset < 0 or offset + n > storage.size:
        msg = (
            f"tensor of size {size} stride {stride} at offset {offset} does not fit "
            f"its storage of {storage.size} elements (corrupt checkpoint)"
        )
        raise pickle.UnpicklingError(msg)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride]
    )
    return view.copy()


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, root: str, path: str):
        super().__init__(file)
        self._zf, self._root, self._path = zf, root, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        msg = (
            f"{self._path}: refusing global {module}.{name}; only state dicts of "
            f"tensors can be read without torch (nothing in the file is executed)"
        )
        raise pickle.UnpicklingError(msg)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            msg = f"{self._path}: unexpected persistent id {pid!r}"
            raise pickle.UnpicklingError(msg)
        _, stype, key, _location, numel = pid
        if stype not in _STORAGE_DTYPES:
            msg = f"{self._path}: unsupported storage type {stype!r}"
            raise pickle.UnpicklingError(msg)
        if key not in self._storages:
            dtype = np.dtype(_STORAGE_DTYPES[stype])
            try:
                raw = self._zf.read(f"{self._root}/data/{key}")
            except KeyError:
                msg = f"{self._path}: storage {key!r} missing from the archive"
                raise pickle.UnpicklingError(msg) from None
            if len(raw) < numel * dtype.itemsize:
                msg = f"{self._path}: storage {key!r} is truncated"
                raise pickle.UnpicklingError(msg)
            self._storages[key] = np.frombuffer(raw, dtype, count=numel)
        return self._storages[key]


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Tensors of a ``torch.save()`` zip checkpoint as ``{name: ndarray}``.

    Raises ``ValueError`` for a file that is not a torch zip checkpoint (legacy
    pre-1.6 pickles included) and ``pickle.UnpicklingError`` for any global
    other than tensors and ``OrderedDict``.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        msg = (
            f"{path} is not a torch zip checkpoint (torch >= 1.6 torch.save format); "
            f"legacy pickles are not read"
        )
        raise ValueError(msg)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            msg = f"{path}: no <root>/data.pkl in the archive (not a torch checkpoint)"
            raise ValueError(msg)
        root = pkl[0].split("/")[0]
        with zf.open(pkl[0]) as f:
            obj = _Unpickler(f, zf, root, path).load()
    if not isinstance(obj, dict) or not all(
        isinstance(v, np.ndarray) for v in obj.values()
    ):
        msg = f"{path}: expected a state dict of tensors, got {type(obj).__name__}"
        raise ValueError(msg)
    return dict(obj)
