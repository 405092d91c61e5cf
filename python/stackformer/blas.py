"""Optional BLAS backend for the Linear products.

stackformer's matrix products run on its own register tiles: AVX-512 or AVX2/FMA where the
CPU has them (at the benchmark's M shapes 1.06x OpenBLAS's speed on the machine it ran on),
portable C elsewhere. On a CPU without AVX2 (an ARM laptop, an old x86) that portable path is
several times slower than a tuned BLAS, so the library can hand its Linear products (forward,
input and weight gradients, LM head) to a CBLAS that is already on the machine:

    >>> import stackformer as sf
    >>> sf.use_blas()                  # OpenBLAS, BLIS, Accelerate, ... found on the system
    'OpenBLAS 0.3.21 ... (libopenblas.so.0): cblas_sgemm, 32-bit integers, its own threads set to 1'
    >>> sf.matmul_kernel()
    'blas'
    >>> sf.use_builtin_matmul()        # back to the tiles

stackformer links no BLAS and installs none; this loads one at run time with ctypes. Attention
keeps its own tiles either way. With a BLAS, results are the BLAS's: the same to float
rounding, but the tiles' bitwise guarantees (identical bits for any thread count, cached
decoding equal to the full pass) no longer hold.
"""
import ctypes
import ctypes.util
import os
import sys
from typing import List, Optional, Tuple

from . import _core

__all__ = ["use_blas", "use_builtin_matmul", "blas_info", "find_blas"]

# The loaded library and its description. ctypes never unloads a library, and keeping the
# handle here keeps the function the C core points at alive and findable.
_lib: Optional[ctypes.CDLL] = None
_info: Optional[str] = None

# cblas_sgemm's names: (symbol, 64-bit integers). OpenBLAS's INTERFACE64 builds either suffix
# their symbols (cblas_sgemm64_, scipy_cblas_sgemm64_) or keep the plain name and say
# USE64BITINT in openblas_get_config(), checked below.
_SYMBOLS = [("cblas_sgemm", False), ("cblas_sgemm64_", True), ("scipy_cblas_sgemm64_", True),
            ("scipy_cblas_sgemm", False)]
_LIB_NAMES = ["openblas", "blis", "cblas", "blas", "mkl_rt"]
_ACCELERATE = "/System/Library/Frameworks/Accelerate.framework/Accelerate"


def find_blas() -> List[str]:
    """Candidate BLAS libraries on this machine, most likely first (names or paths that
    ``ctypes.CDLL`` can load): ``$STACKFORMER_BLAS`` if set, then OpenBLAS, BLIS, the
    reference CBLAS / BLAS, MKL, and Accelerate on macOS."""
    out = []
    if os.environ.get("STACKFORMER_BLAS"):
        out.append(os.environ["STACKFORMER_BLAS"])
    for name in _LIB_NAMES:
        found = ctypes.util.find_library(name)
        if found and found not in out:
            out.append(found)
    if sys.platform == "darwin" and os.path.exists(_ACCELERATE):
        out.append(_ACCELERATE)
    return out


def _openblas_fn(lib: ctypes.CDLL, name: str, suffix64: bool):
    """OpenBLAS's extension `openblas_<name>` under any of its export names (NumPy's copy
    prefixes scipy_, 64-bit-integer builds may suffix 64_), or None for other libraries."""
    names = [f"scipy_openblas_{name}64_", f"openblas_{name}64_"] if suffix64 else []
    for full in names + [f"openblas_{name}", f"scipy_openblas_{name}"]:
        fn = getattr(lib, full, None)
        if fn is not None:
            return fn
    return None


def _config(lib: ctypes.CDLL, suffix64: bool) -> str:
    """OpenBLAS's build description (version, target, USE64BITINT), or "" for other BLAS."""
    fn = _openblas_fn(lib, "get_config", suffix64)
    if fn is None:
        return ""
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    raw = fn()
    return raw.decode(errors="replace").strip() if raw else ""


def _set_threads(lib: ctypes.CDLL, n: int, suffix64: bool) -> bool:
    """Set an OpenBLAS's thread count (other libraries: their own environment variables)."""
    fn = _openblas_fn(lib, "set_num_threads", suffix64)
    if fn is None:
        return False
    fn.restype, fn.argtypes = None, [ctypes.c_int]
    fn(n)
    return True


def _load(library: str) -> Tuple[ctypes.CDLL, str, bool]:
    """(library, symbol, 64-bit integers) for a library that exports a cblas_sgemm."""
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        raise OSError(f"cannot load BLAS library {library!r}: {e}") from None
    for symbol, ilp64 in _SYMBOLS:
        if getattr(lib, symbol, None) is not None:
            if not ilp64 and "USE64BITINT" in _config(lib, False).split():
                ilp64 = True
            return lib, symbol, ilp64
    raise ValueError(f"{library!r} exports no cblas_sgemm (looked for {', '.join(s for s, _ in _SYMBOLS)})")


def use_blas(library: Optional[str] = None) -> str:
    """Run every Linear product through a CBLAS ``cblas_sgemm`` from now on (process-wide).

    library: a path or a name ``ctypes.CDLL`` accepts; None tries ``find_blas()`` in order and
        takes the first that loads and passes the check.

    Threads stay stackformer's (``set_num_threads``): a large product's rows are split over
    them and each calls the BLAS on its slice, so an OpenBLAS is set to one thread of its own
    (two thread pools spinning against each other made a train step 1.6x slower; if it is the
    copy NumPy uses, NumPy's products then run on one thread too). For other
    libraries set their variable to 1 yourself (``BLIS_NUM_THREADS``, ``MKL_NUM_THREADS``,
    ``VECLIB_MAXIMUM_THREADS``).

    The C core first checks the function on three small products against a double-precision
    loop, and refuses it (ValueError, the previous backend stays) if they come out wrong.
    Returns a one-line description of what now runs the products.

    Raises FileNotFoundError when library is None and no BLAS is found, OSError when the
    library cannot be loaded, ValueError when it has no cblas_sgemm or fails the check.
    """
    global _lib, _info
    candidates = [library] if library is not None else find_blas()
    if not candidates:
        raise FileNotFoundError("no BLAS library found (looked for $STACKFORMER_BLAS, "
                                + ", ".join(f"lib{n}" for n in _LIB_NAMES) + "); pass its path")
    errors = []
    for cand in candidates:
        if not isinstance(cand, (str, os.PathLike)):
            raise TypeError(f"library must be a path or a library name, got {type(cand).__name__}")
        cand = os.fspath(cand)
        try:
            lib, symbol, ilp64 = _load(cand)
        except (OSError, ValueError) as e:
            if library is not None:
                raise
            errors.append(str(e))
            continue
        suffix64 = symbol.endswith("64_")
        addr = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        try:
            _core.set_blas_sgemm(addr, ilp64)
        except ValueError as e:
            if library is not None:
                raise ValueError(f"{cand}: {e}") from None
            errors.append(f"{cand}: {e}")
            continue
        one_thread = _set_threads(lib, 1, suffix64)  # only once it is in use
        config = _config(lib, suffix64)
        name = (config or os.path.basename(cand)) + f" ({getattr(lib, '_name', cand)})"
        _lib, _info = lib, (f"{name}: {symbol}, {'64' if ilp64 else '32'}-bit integers"
                            + (", its own threads set to 1" if one_thread else ""))
        return _info
    raise ValueError("no usable BLAS: " + "; ".join(errors))


def use_builtin_matmul() -> None:
    """Back to stackformer's own register tiles for every product (the default)."""
    global _info
    _core.set_blas_sgemm(0, False)
    _info = None


def blas_info() -> Optional[str]:
    """What ``use_blas`` set up (the string it returned), or None on the built-in tiles."""
    return _info if _core.matmul_kernel() == "blas" else None
