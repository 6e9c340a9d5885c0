"""Numba kernels behind lowprec's public functions.

Installed as ``lowprec.kernels`` (the source folder is the top-level ``kernels/``).
Nothing here validates its inputs: the public layer in ``lowprec`` does that and
hands over arrays of the exact dtypes and layouts each kernel documents.
"""

import glob as _glob
import hashlib as _hashlib
import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def _cache_dir() -> str:
    """The folder where numba caches this package's kernels (in-tree
    __pycache__, or numba's user-wide / NUMBA_CACHE_DIR location)."""
    try:
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
        return impl(_cache_dir).locator.get_cache_path()
    except Exception:  # noqa: BLE001 (a numba without these internals)
        return _os.path.join(_HERE, "__pycache__")


def _drop_stale_cache() -> str:
    """numba's cache (``cache=True``) checks only the source file of each
    function, but the kernels inline intrinsics and helpers from the other
    files here: after an edit or an upgrade of one file, the functions of an
    unchanged file would load machine code built against the old one (seen:
    a conv kernel kept an old epilogue after int8_gemm_vnni.py changed). One
    stamp over every kernel source; when it differs, this package's cache
    files are removed. ~1 ms per import. Returns the stamp (SOURCE_STAMP:
    caches of measured kernel speeds key on it too)."""
    digest = _hashlib.sha256()
    names = []
    for path in sorted(_glob.glob(_os.path.join(_HERE, "*.py"))):
        name = _os.path.basename(path)
        names.append(name[:-3])
        with open(path, "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    stamp = digest.hexdigest()
    cache = _cache_dir()
    stamp_file = _os.path.join(cache, "lowprec-kernels.stamp")
    try:
        with open(stamp_file) as f:
            if f.read().strip() == stamp:
                return stamp
    except OSError:
        pass
    try:
        for ext in ("nbi", "nbc"):
            for path in _glob.glob(_os.path.join(cache, f"*.{ext}")):
                if _os.path.basename(path).split(".")[0] in names:
                    _os.remove(path)
        _os.makedirs(cache, exist_ok=True)
        with open(stamp_file, "w") as f:
            f.write(stamp + "\n")
    except OSError:  # read-only or raced by another process: numba copes
        pass
    return stamp


SOURCE_STAMP = _drop_stale_cache()
