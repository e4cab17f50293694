"""Reading pickles that come from outside without running anything from them.

A pickle can name any importable function and have the loader call it, so opening
somebody else's ``.pkl`` with :func:`pickle.load` can run arbitrary code. Every plain
pickle the project reads (detectron2 proposal files, detectron2 weight pickles, CIFAR
batches) goes through :func:`safe_load_pickle`, whose :class:`RestrictedUnpickler`
resolves only the few globals numpy arrays need plus plain containers; any other global
stops the load before it is called. What a file may hold is one set for every kind of
file: numbers, strings, bytes, lists, tuples, dicts (also ``OrderedDict``), sets, and
numpy arrays and scalars of plain number and string dtypes.

Arrays come only through numpy's own unpickling paths (``_reconstruct`` of an empty
``ndarray`` followed by its state, ``_frombuffer``, ``scalar``), never through a direct
``numpy.ndarray(shape, dtype, buffer)`` call, and every dtype, also one whose state is set
afterwards, must be a plain one (no fields, no sub-arrays, no objects, honest flags), so
the file's bytes can never be read as object pointers. A length field larger than what is
left of the file is refused before anything is allocated for it.
"""
import _compat_pickle
import collections
import os
import pickle
import struct
from typing import Dict, Optional

import numpy as np

from .errors import WrnDetError

__all__ = ["RestrictedUnpickler", "safe_load_pickle", "ADMITTED"]

#: Said in every refusal: what a file read here may hold.
ADMITTED = "numpy arrays of numbers or strings, lists, tuples, dicts, sets, strings, bytes and numbers"

# dtype kinds an array may have: booleans, integers, floats, complex numbers, byte and unicode strings
_PLAIN_KINDS = "biufcSU"


class _Refused(Exception):
    """Raised while unpickling; its message says what was refused ("global os.system", ...)."""


class _TooLong(pickle.UnpicklingError):
    """A record announces more bytes than the file has left: a truncated file, or one made to exhaust memory."""


def _numpy_global(qualname: str):
    """Return the numpy object at ``qualname`` (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    module, _, name = qualname.rpartition(".")
    for prefix in ("numpy._core", "numpy.core"):
        try:
            mod = __import__(f"{prefix}.{module}", fromlist=[name])
            return getattr(mod, name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(qualname)  # pragma: no cover - every supported numpy has these


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles ``bytes`` at protocol < 3 as _codecs.encode(str, "latin1"); only that use is admitted
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only 'latin1' is admitted)")
    return text.encode("latin1")


def _from_bytes_only(kind):
    # bytes(n) / bytearray(n) with a number would allocate n bytes: only copies of strings and bytes
    def make(value=b"", *args):
        if not isinstance(value, (bytes, bytearray, str)):
            raise _Refused(f"{kind.__name__}() of a {type(value).__name__} (only bytes and strings are admitted)")
        return kind(value, *args)

    return make


def _box_mode(value):
    # detectron2 writes ``BoxMode.XYXY_ABS.value``, but a pickled enum member is
    # BoxMode(value); read it as its int without importing detectron2
    if not isinstance(value, int) or not 0 <= value <= 4:
        raise pickle.UnpicklingError(f"BoxMode({value!r}) is not a detectron2 box mode")
    return int(value)


class _NdarrayToken:
    """What the global ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, not callable.

    Calling ``numpy.ndarray(shape, dtype, buffer)`` directly would build an array of any
    dtype over raw bytes from the file, including an object array whose items are raw
    pointers; numpy's own unpickling paths refuse that, so only they are admitted.
    """

    def __call__(self, *args, **kwargs):
        raise _Refused("a direct call of numpy.ndarray (arrays are admitted only through numpy's unpickling)")


_NDARRAY = _NdarrayToken()


def _is_plain_dtype(d) -> bool:
    """Return True if ``d`` is a dtype of one number or string: no fields, no sub-array, no objects, honest flags."""
    return (isinstance(d, np.dtype) and d.fields is None and d.subdtype is None and d.kind in _PLAIN_KINDS
            and d.flags == np.dtype(d.str).flags)


def _plain_dtype(spec, align=False, copy=False):
    # numpy pickles a dtype as dtype(<type code>, align, copy) followed by its state
    if not isinstance(spec, str):
        raise _Refused(f"a dtype built from {type(spec).__name__} {spec!r:.40}")
    d = np.dtype(spec, bool(align), bool(copy))
    if not _is_plain_dtype(d):
        raise _Refused(f"dtype {spec!r} (only plain number and string dtypes are admitted)")
    return d


def _check_dtype_state(d: np.dtype, state) -> None:
    # dtype.__setstate__ trusts the flags it is given: a structured dtype whose object field
    # is not flagged would let an array's raw bytes be read as object pointers. Apply the
    # state to a copy first and admit it only if the result is a plain dtype of the same size.
    probe = np.dtype(d, copy=True)
    probe.__setstate__(state)
    if not (_is_plain_dtype(probe) and probe.kind == d.kind and probe.itemsize == d.itemsize):
        raise _Refused(f"a dtype state that turns {d} into {probe!r:.60} (only plain dtypes are admitted)")


def _allowed_globals() -> Dict[tuple, object]:
    """Return {(module, name): object} of every global a file may name."""
    reconstruct = _numpy_global("multiarray._reconstruct")
    scalar = _numpy_global("multiarray.scalar")
    frombuffer = _numpy_global("numeric._frombuffer")

    def safe_reconstruct(subtype, shape, typecode):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by its state;
        # another shape would allocate an array of that size before the state replaces it
        if subtype is not _NDARRAY:
            raise _Refused(f"_reconstruct of {type(subtype).__name__} (only numpy.ndarray is admitted)")
        if tuple(shape) != (0,) or typecode not in (b"b", "b"):
            raise _Refused(f"_reconstruct with shape {shape!r:.40} and type {typecode!r:.20} (numpy writes (0,), b'b')")
        return reconstruct(np.ndarray, (0,), b"b")

    def safe_frombuffer(buf, dtype, shape, order):
        # protocol-5 pickles of contiguous arrays
        if not _is_plain_dtype(dtype):
            raise _Refused(f"_frombuffer with dtype {dtype!r:.60}")
        return frombuffer(buf, dtype, shape, order)

    def safe_scalar(dtype, obj=None):
        # numpy scalars (an np.int64 image id, say)
        if not _is_plain_dtype(dtype):
            raise _Refused(f"a numpy scalar of dtype {dtype!r:.60}")
        return scalar(dtype) if obj is None else scalar(dtype, obj)

    allowed = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): _from_bytes_only(bytearray),
        ("builtins", "bytes"): _from_bytes_only(bytes),
        ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("detectron2.structures.boxes", "BoxMode"): _box_mode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = safe_reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = safe_scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = safe_frombuffer
    return allowed


class _BoundedFile:
    """A read-only view of a file that refuses to read past its end in one request.

    A pickle's length fields (of strings, bytes, frames) are trusted by the unpickler, which
    asks for that many bytes at once; a field larger than the rest of the file would make it
    allocate that much. Refusing such a request keeps memory bounded by the file's size.
    """

    def __init__(self, f, size: int):
        self._f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes; refuse a request for more than the file has left."""
        if n is not None and n > self.left:
            raise _TooLong(f"it announces a record of {n} bytes where the file has {self.left} left: truncated, or not a pickle")
        data = self._f.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        """Return the next line."""
        data = self._f.readline()
        self.left -= len(data)
        return data


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that resolves only numpy-array and plain-container globals.

    Strings, numbers, bytes, lists, tuples, dicts and sets need no global and load as
    usual; numpy arrays, dtypes and numpy scalars are rebuilt through numpy's own
    reconstruction functions, for plain dtypes only. Any other global (``os.system``,
    ``builtins.eval``, a class with a malicious ``__reduce__`` ...) raises before anything
    is called, and so does setting the state of anything but an array or a plain dtype.

    It extends Python's pure-Python unpickler (``pickle._Unpickler``): the C one offers no
    hook on the BUILD opcode, which is where a dtype's state has to be checked.
    """

    _ALLOWED: Optional[Dict[tuple, object]] = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, size: int, **kwargs):
        self._bounded = _BoundedFile(file, size)
        super().__init__(self._bounded, **kwargs)

    def find_class(self, module: str, name: str):
        """Return the admitted object for ``module.name``; anything else raises before it is imported."""
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        # Python 2 names (__builtin__, copy_reg ...), mapped as pickle.Unpickler.find_class maps
        # them; no Python 3 module has these names, so the mapping is safe at any protocol
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = RestrictedUnpickler._ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        """Refuse persistent ids (they would need an application-defined loader)."""
        raise _Refused(f"persistent id {pid!r:.40}")

    def load_build(self):
        """Set the state of the object under the top of the stack: an array, or a dtype whose new state is plain."""
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif type(inst) is not np.ndarray:
            raise _Refused(f"setting the state of a {type(inst).__name__} object")
        super().load_build()

    def load_bytearray8(self):
        """Read protocol 5's BYTEARRAY8 (numpy arrays), refusing a length larger than what is left to read.

        Python's own version allocates the announced length before reading it.
        """
        (n,) = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame
        left = frame.getbuffer().nbytes - frame.tell() if frame else self._bounded.left
        if n > left:
            raise _TooLong(f"it announces a record of {n} bytes where the file has {left} left: truncated, or not a pickle")
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def safe_load_pickle(path: str, what: str = "pickle file"):
    """Return the object pickled in ``path``, read through :class:`RestrictedUnpickler`.

    ``what`` names the kind of file in messages ("proposal file", "detectron2 weights
    file", ...). Python 2 pickles are read with ``encoding="latin1"``, as detectron2 does.
    Raises :class:`WrnDetError` (one line naming ``path``) if the file is missing, is not
    a pickle, or holds anything but what :data:`ADMITTED` lists; nothing from a refused
    file is run.
    """
    if not os.path.isfile(path):
        raise WrnDetError(f"{what} {path} not found: the file does not exist")
    try:
        with open(path, "rb") as f:  # read from the file: a COCO proposal file can be gigabytes
            size = os.fstat(f.fileno()).st_size
            return RestrictedUnpickler(f, size, encoding="latin1").load()
    except _Refused as e:
        raise WrnDetError(f"{what} {path}: refused to load {e} (a {what} may hold only {ADMITTED}); "
                          "nothing from it was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError, OverflowError, RecursionError) as e:
        detail = " ".join(str(e).split())[:200]
        raise WrnDetError(f"{what} {path}: not a readable pickle, it cannot be unpickled "
                          f"({detail if isinstance(e, _TooLong) else type(e).__name__ + ': ' + detail}); "
                          "nothing from it was run") from None
    except OSError as e:
        raise WrnDetError(f"{what} {path} cannot be read: {e.strerror or e}") from None
