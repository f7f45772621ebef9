"""Read and write PyTorch ``torch.save`` checkpoints without importing torch.

Since torch 1.6, ``torch.save`` writes an uncompressed zip archive whose records
share one top-level folder of arbitrary name, ``<archive>``:

* ``<archive>/data.pkl``: the object tree, pickled (protocol 2). A tensor is the call
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
  (``nn.Parameter`` wraps it in ``_rebuild_parameter``; dtypes without a legacy storage
  class, e.g. ``uint16`` and ``float8_*``, use ``_rebuild_tensor_v3`` with an extra dtype).
* Storages are pickle persistent ids ``('storage', torch.FloatStorage, key, location,
  numel)`` whose bytes are the record ``<archive>/data/<key>``. Offsets, sizes and
  strides count elements; several tensors may view one storage.
* ``<archive>/byteorder`` (``little`` or ``big``) and ``<archive>/version``.

:func:`load` imports nothing: tensors become NumPy arrays and unknown globals become
:class:`Placeholder` objects. :func:`open_state_dict` yields the tensors unread
(:class:`StoredTensor`), so a caller can check names and shapes before paying for them.
:func:`save` writes files ``torch.load(weights_only=True)`` reads.

A checkpoint may come from anywhere, so no size it declares is trusted: storage sizes must
equal their zip records' sizes, records must fit in the file (and compressed ones inflate
only to a bounded ratio, read in chunks that stop at the declared size), and tensor views
must lie inside their storage without repeating elements. Reading therefore never needs
much more memory than the file's own size, whatever the file claims.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import pickle
import sys
import threading
import types
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from hmar_jax.atomic_io import atomic_write

PathLike = str | os.PathLike[str]

# torch dtype name -> (legacy storage class name, or None where torch uses _rebuild_tensor_v3; NumPy dtype).
_DTYPES: dict[str, tuple[str | None, np.dtype]] = {
    name: (storage, np.dtype(dtype))
    for name, storage, dtype in [
        ("float32", "FloatStorage", np.float32),
        ("float64", "DoubleStorage", np.float64),
        ("float16", "HalfStorage", np.float16),
        ("bfloat16", "BFloat16Storage", ml_dtypes.bfloat16),
        ("complex64", "ComplexFloatStorage", np.complex64),
        ("complex128", "ComplexDoubleStorage", np.complex128),
        ("int64", "LongStorage", np.int64),
        ("int32", "IntStorage", np.int32),
        ("int16", "ShortStorage", np.int16),
        ("int8", "CharStorage", np.int8),
        ("uint8", "ByteStorage", np.uint8),
        ("bool", "BoolStorage", np.bool_),
        ("uint16", None, np.uint16),
        ("uint32", None, np.uint32),
        ("uint64", None, np.uint64),
        ("float8_e4m3fn", None, ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", None, ml_dtypes.float8_e5m2),
        ("float8_e4m3fnuz", None, ml_dtypes.float8_e4m3fnuz),
        ("float8_e5m2fnuz", None, ml_dtypes.float8_e5m2fnuz),
    ]
}
_STORAGE_DTYPES = {storage: dtype for storage, dtype in _DTYPES.values() if storage}
_STORAGE_NAMES = {dtype: storage for storage, dtype in _STORAGE_DTYPES.items()}
_REPAIR = "Re-download the file or re-save it with torch.save(obj, path)"

# Bounds on what a file may declare, so that reading costs memory in proportion to its size.
PICKLE_LIMIT = 16 << 20  # bytes of data.pkl: a state_dict's object tree pickles to ~200 bytes a tensor
INFLATE_LIMIT = 16  # the records together may inflate to this many times the file's size ...
ALIAS_LIMIT = 2  # ... and the tensors hold at most this many times the bytes of their storages
_ALLOWANCE = 1 << 20  # added to both bounds, for small files (records of zeros, tied small tensors)
_CHUNK = 1 << 20  # bytes inflated per read
_MAX_DIMS = 64  # NumPy's limit


class CheckpointFormatError(ValueError):
    """A file is not a checkpoint this module can read, or an object cannot be saved as one."""


def _error(path: PathLike, problem: str, fix: str = _REPAIR) -> CheckpointFormatError:
    return CheckpointFormatError(f"{os.fspath(path)}: {problem}. {fix}.")


class Placeholder:
    """Stands in for an object whose class the restricted unpickler refused to import.

    Each refused global ``module.name`` gets its own subclass named ``name``. Attributes:
    ``module``, ``name``, ``args`` (what the object was created with), ``state`` (what
    pickle passed to ``__setstate__``, usually the original ``__dict__``; else None) and
    ``items``/``list_items`` (entries pickle added to dict/list subclasses).
    """

    module: str = ""
    name: str = ""
    args: tuple[Any, ...]
    state: Any
    items: dict[Any, Any]
    list_items: list[Any]

    def __new__(cls, *args: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items, obj.list_items = args, None, {}, []
        return obj

    def __init__(self, *args: Any) -> None:
        """Accepts the arguments, which ``__new__`` recorded."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def __repr__(self) -> str:
        return f"Placeholder({self.module}.{self.name}, args={self.args!r}, state={self.state!r})"


class _StorageType(NamedTuple):
    """What ``find_class`` returns for a torch storage class; the unpickler gets it back in persistent ids."""

    dtype: np.dtype


class _Storage(NamedTuple):
    """A storage record: its zip entry and the element type and count data.pkl declares for it."""

    record: zipfile.ZipInfo
    dtype: np.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _swap_bytes(array: np.ndarray) -> None:
    """Reverses the byte order of each element (each complex component) of a C-contiguous array."""
    width = array.dtype.itemsize // (2 if array.dtype.kind == "c" else 1)
    if width > 1:
        array.reshape(-1).view(f"u{width}").byteswap(inplace=True)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _Archive:
    """An open checkpoint zip whose records are read only after their sizes were checked.

    Every size the archive declares is compared with what it can really hold before
    anything is allocated: records must fit in the file without sharing bytes, stored
    records hold exactly their declared size, all records together may inflate to at most
    :data:`INFLATE_LIMIT` times the file's size (torch.save never compresses), and reads go
    in chunks that stop at the declared size, so a record that inflates past it (a
    compression bomb whose header lies) is cut there and refused by its CRC.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = path
        self.zip = _open_zip(path)
        self.byteorder_swap = False
        self._cached: tuple[str, bytearray] | None = None  # the last storage read, for views sharing it
        try:
            self._check_sizes(os.path.getsize(path))
        except BaseException:
            self.zip.close()
            raise

    def _check_sizes(self, file_size: int) -> None:
        path, records = self.path, self.zip.infolist()
        for info in records:
            if info.header_offset + info.compress_size > file_size:
                raise _error(path, f"zip record {info.filename!r} extends past the end of the file "
                                   "(the file is truncated)")
        if sum(info.compress_size for info in records) > file_size:
            raise _error(path, "zip records overlap (several entries share the same bytes)")
        declared = sum(info.file_size for info in records)
        if declared > INFLATE_LIMIT * file_size + _ALLOWANCE:
            raise _error(path, f"its zip records declare {declared} bytes in a file of {file_size} "
                               "(a compression bomb?); torch.save never compresses",
                         "Re-save the checkpoint with torch.save(obj, path)")

    def close(self) -> None:
        self._cached = None
        self.zip.close()

    def record(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.zip.getinfo(name)
        except KeyError:
            raise _error(self.path, f"record {name!r} is missing") from None

    def read(self, info: zipfile.ZipInfo, limit: int) -> bytearray:
        """The bytes of record ``info``, refused if it declares more than ``limit`` bytes."""
        name, size = info.filename, info.file_size
        if size > limit:
            raise _error(self.path, f"record {name!r} declares {size} bytes, more than the {limit} "
                                    "this reader accepts for it")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != size:
            raise _error(self.path, f"stored zip record {name!r} declares {size} bytes but holds "
                                    f"{info.compress_size}")
        data = bytearray(size)
        view = memoryview(data)
        try:
            with self.zip.open(info) as record:
                filled = 0
                while filled < size:
                    chunk = record.read(min(_CHUNK, size - filled))
                    if not chunk:
                        raise _error(self.path, f"zip record {name!r} holds {filled} bytes, not "
                                                f"the {size} its header declares")
                    view[filled:filled + len(chunk)] = chunk  # zipfile checks the CRC at the end
                    filled += len(chunk)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as exc:
            raise _error(self.path, f"zip record {name!r} is corrupt ({exc})") from exc
        return data

    def storage_bytes(self, storage: _Storage) -> bytearray:
        name = storage.record.filename
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # released before the next storage is allocated
            self._cached = (name, self.read(storage.record, storage.nbytes))
        return self._cached[1]


class StoredTensor:
    """A tensor of an open checkpoint (:func:`open_state_dict`) whose bytes are not read yet.

    Its ``shape``, ``dtype`` and layout come from data.pkl and were checked against the
    size its storage declares; ``np.asarray(tensor)`` (or :meth:`read`) reads the bytes.
    A converter checks every shape against the layout it expects first, so a file that
    declares tensors of the wrong size is refused before any of them is read.
    """

    def __init__(self, archive: _Archive, storage: _Storage, dtype: np.dtype, offset: int,
                 shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self._archive, self._storage = archive, storage
        self.dtype, self.shape = dtype, shape
        self._offset, self._strides = offset, strides

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor as a C-contiguous array in native byte order."""
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        storage = self._archive.storage_bytes(self._storage)
        itemsize = self.dtype.itemsize
        array = np.ndarray(self.shape, self.dtype, storage, self._offset * itemsize,
                           [s * itemsize for s in self._strides]).copy()
        if self._archive.byteorder_swap:
            _swap_bytes(array)
        return array

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"StoredTensor(shape={self.shape}, dtype={self.dtype})"


def _layout_problem(shape: tuple[int, ...], strides: tuple[int, ...], offset: int,
                    dtype: np.dtype, storage: _Storage) -> str | None:
    """Why a view ``(offset, shape, strides)`` of ``storage`` cannot be read, or None.

    Views of distinct elements are accepted (slices, transposes, permutations): with the
    dimensions ordered by stride, each stride must step past everything the smaller ones
    reach. A stride 0 or an overlap would let a few stored bytes declare an arbitrarily
    large tensor.
    """
    layout = f"shape {shape}, strides {strides} and offset {offset}"
    if 0 in shape:
        return None
    reach = 1  # elements spanned by the dimensions checked so far
    for stride, length in sorted((s, n) for n, s in zip(shape, strides, strict=True) if n > 1):
        if stride == 0:
            return f"a tensor of {layout} repeats elements (stride 0, a broadcast view)"
        if stride < reach:
            return f"a tensor of {layout} overlaps itself (its elements share storage)"
        reach += (length - 1) * stride
    needed = (offset + reach) * dtype.itemsize
    if needed > storage.nbytes:
        return (f"storage record {storage.record.filename!r} has {storage.nbytes} bytes; a "
                f"{dtype} tensor of {layout} needs {needed}")
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` without importing anything; tensors become :class:`StoredTensor`
    (or, with ``eager``, arrays read at once). Checks every storage and view size first."""

    def __init__(self, archive: _Archive, prefix: str, eager: bool) -> None:
        super().__init__(io.BytesIO(archive.read(archive.record(f"{prefix}/data.pkl"), PICKLE_LIMIT)))
        self._archive, self._prefix, self._path, self._eager = archive, prefix, archive.path, eager
        has_byteorder = f"{prefix}/byteorder" in archive.zip.NameToInfo
        record = archive.read(archive.record(f"{prefix}/byteorder"), 16) if has_byteorder else b"little"
        byteorder = bytes(record).decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _error(self._path, f"record '{prefix}/byteorder' names an unknown byte order {byteorder!r}")
        archive.byteorder_swap = byteorder != sys.byteorder
        self._storages: dict[tuple[str, np.dtype], _Storage] = {}
        self._storage_bytes = self._tensor_bytes = 0
        self._placeholders: dict[tuple[str, str], type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(np.dtype(np.uint8))
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name][1]
        if (module, name) not in self._placeholders:
            self._placeholders[module, name] = type(name, (Placeholder,), {"module": module, "name": name})
        return self._placeholders[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _error(self._path, f"data.pkl holds an unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            is_placeholder = isinstance(storage_type, type) and issubclass(storage_type, Placeholder)
            found = f"{storage_type.module}.{storage_type.name}" if is_placeholder else repr(storage_type)
            supported = ", ".join(f"torch.{name}" for name in [*_STORAGE_DTYPES, "UntypedStorage"])
            raise _error(self._path, f"unsupported storage type {found}", f"Supported: {supported}")
        if not isinstance(key, str) or not _is_count(numel):
            raise _error(self._path, f"data.pkl declares a storage with key {key!r} and size {numel!r}")
        name, dtype = f"{self._prefix}/data/{key}", storage_type.dtype
        if (name, dtype) not in self._storages:
            storage = _Storage(self._archive.record(name), dtype, numel)
            if storage.record.file_size != storage.nbytes:
                declared = f"{numel} elements of {dtype} ({storage.nbytes} bytes)"
                problem = f"storage record {name!r} holds {storage.record.file_size} bytes, not {declared}"
                raise _error(self._path, problem)
            self._storages[name, dtype] = storage
            self._storage_bytes += storage.nbytes
        return self._storages[name, dtype]

    def _rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
        return self._tensor(storage, getattr(storage, "dtype", None), offset, size, stride)

    def _rebuild_tensor_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> Any:
        return self._tensor(storage, dtype, offset, size, stride)

    def _tensor(self, storage: Any, dtype: Any, offset: Any, size: Any, stride: Any) -> Any:
        """A view of ``storage``, checked before anything is read; ``offset`` and ``stride``
        count ``dtype`` elements."""
        if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
            raise _error(self._path, f"a tensor is built from {storage!r} with dtype {dtype!r}")
        size, stride = tuple(size), tuple(stride)
        if (len(size) != len(stride) or len(size) > _MAX_DIMS
                or not all(map(_is_count, (offset, *size, *stride)))):
            raise _error(self._path, f"invalid tensor layout size={size} stride={stride} offset={offset}")
        if problem := _layout_problem(size, stride, offset, dtype, storage):
            raise _error(self._path, problem, "Re-download the file, or re-save it with each tensor "
                                              "made contiguous (tensor.contiguous())")
        tensor = StoredTensor(self._archive, storage, dtype, offset, size, stride)
        self._tensor_bytes += tensor.nbytes
        if self._tensor_bytes > ALIAS_LIMIT * self._storage_bytes + _ALLOWANCE:
            problem = (f"its tensors view the same stored bytes over and over ({self._tensor_bytes} "
                       f"bytes of tensors from {self._storage_bytes} bytes of storage)")
            raise _error(self._path, problem, "Re-save the checkpoint with each tensor cloned")
        return tensor.read() if self._eager else tensor


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**62


def _open_zip(path: PathLike) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        problem = "is a directory, not a checkpoint file" if os.path.isdir(path) else "no such file"
        raise _error(path, problem, "Check the path, and that the download or copy finished")
    with open(path, "rb") as file:
        head = file.read(16)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        if not head or head.startswith(b"PK"):
            problem = f"is a truncated or corrupt zip archive ({exc})" if head else "is empty"
            raise _error(path, problem) from exc
        if head.startswith(b"\x80"):
            problem = "is a bare pickle, not a zip archive: probably a legacy (pre-1.6) torch.save file"
            fix = "Re-save it with torch.save(torch.load(path), path) from torch>=1.6 (zip format)"
        elif head[8:9] == b"{":
            problem = "is a safetensors file, not a PyTorch checkpoint"
            fix = "Load it with safetensors.numpy.load_file"
        else:
            problem = "is not a zip archive, so not a PyTorch (torch>=1.6) checkpoint"
            fix = (
                "It may be a legacy pre-1.6 torch file (re-save it with torch.save(obj, path) from "
                "torch>=1.6), or not a PyTorch checkpoint at all (e.g. .npz or .safetensors)"
            )
        raise _error(path, problem, fix) from exc


def _find_prefix(archive: zipfile.ZipFile, path: PathLike) -> str:
    names = archive.namelist()
    for name in names:
        prefix, _, leaf = name.partition("/")
        if leaf == "data.pkl":
            return prefix
    if any(name.endswith(".npy") for name in names):
        raise _error(path, "is a NumPy .npz archive, not a PyTorch checkpoint", "Load it with numpy.load")
    listing = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise _error(path, f"zip archive has no '<archive>/data.pkl' entry (entries: {listing})")


def _unpickle(archive: _Archive, eager: bool) -> Any:
    unpickler = _RestrictedUnpickler(archive, _find_prefix(archive.zip, archive.path), eager)
    try:
        return unpickler.load()
    except CheckpointFormatError:
        raise
    except Exception as exc:
        raise _error(archive.path, f"data.pkl could not be unpickled ({type(exc).__name__}: {exc})") from exc


def load(path: PathLike) -> Any:
    """Loads a ``torch.save`` checkpoint (zip format, torch>=1.6) without torch.

    Tensors and parameters become C-contiguous NumPy arrays (bfloat16 and float8 as
    ``ml_dtypes`` arrays), torch dtypes become NumPy dtypes, and other globals are
    never imported: they become :class:`Placeholder` objects. Every declared size is
    checked before it is allocated (see :class:`_Archive` and :func:`_layout_problem`),
    so memory stays proportional to the file's size.

    Args:
        path: The checkpoint file.

    Returns:
        The saved object tree, e.g. an ``OrderedDict`` of arrays.

    Raises:
        CheckpointFormatError: The file is missing, not a torch>=1.6 checkpoint, corrupt,
            declares sizes it does not hold, or uses an unsupported storage type.
    """
    archive = _Archive(path)
    try:
        return _unpickle(archive, eager=True)
    finally:
        archive.close()


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    listing = ", ".join(map(repr, keys[:20])) + (", ..." if len(keys) > 20 else "")
    odd = [f"; {k!r} holds {type(v).__name__}" for k, v in obj.items() if not isinstance(v, StoredTensor)]
    return f"a {type(obj).__name__} with keys [{listing}]" + (odd[0] if odd else "")


@contextlib.contextmanager
def open_state_dict(path: PathLike, *, subtree: str | None = None) -> Iterator[dict[str, StoredTensor]]:
    """Opens a checkpoint holding a state_dict as ``{name: StoredTensor}``, nothing read yet.

    Names, shapes and dtypes are known at once; ``np.asarray(tensor)`` reads a tensor's
    bytes while the block runs. A converter checks the shapes against the layout it
    expects before reading, so a wrong file costs no memory.

    Args:
        path: The checkpoint file.
        subtree: Slash-separated key path to a nested state_dict, e.g.
            ``"trainer/transformer_wo_ddp"`` in a training checkpoint.

    Raises:
        CheckpointFormatError: As :func:`load`, or the selected object is not a mapping
            of names to tensors (the message lists its keys).
    """
    archive = _Archive(path)
    try:
        obj, where = _unpickle(archive, eager=False), "the top-level object"
        for part in subtree.strip("/").split("/") if subtree else []:
            if not isinstance(obj, Mapping) or part not in obj:
                problem = f"subtree {subtree!r} not found: {where} is {_describe(obj)}, with no key {part!r}"
                raise _error(path, problem, "Pass a slash-separated path of existing keys")
            obj, where = obj[part], f"the object at subtree {subtree!r}"
        if not (isinstance(obj, Mapping)
                and all(isinstance(k, str) and isinstance(obj[k], StoredTensor) for k in obj)):
            fix = ("A slash-separated subtree= path (e.g. 'trainer/transformer_wo_ddp') selects a "
                   "nested state_dict")
            raise _error(path, f"{where} is {_describe(obj)}, not a mapping of names to arrays", fix)
        yield dict(obj)
    finally:
        archive.close()


def load_state_dict(path: PathLike, *, subtree: str | None = None) -> dict[str, np.ndarray]:
    """Loads a checkpoint holding a state_dict, as ``{name: array}`` in saved order.

    Arguments and errors as :func:`open_state_dict`, which reads the same without
    reading the tensors yet.
    """
    with open_state_dict(path, subtree=subtree) as state_dict:
        return {name: tensor.read() for name, tensor in state_dict.items()}


def _stand_in_module(name: str, members: list[str]) -> types.ModuleType:
    """A module whose classes the standard pickler writes as the globals ``name.<member>``."""
    module = types.ModuleType(name)
    for member in members:
        setattr(module, member, type(member, (), {"__module__": name, "__qualname__": member}))
    return module


# Stand-ins for the torch globals a checkpoint names; put in sys.modules only while pickling.
_TORCH = _stand_in_module("torch", list(_STORAGE_DTYPES))
_TORCH_UTILS = _stand_in_module("torch._utils", ["_rebuild_tensor_v2"])
_STAND_IN_LOCK = threading.Lock()


@contextlib.contextmanager
def _torch_stand_ins() -> Iterator[None]:
    with _STAND_IN_LOCK:
        saved = {name: sys.modules.pop(name, None) for name in ("torch", "torch._utils")}
        try:
            sys.modules.update({"torch": _TORCH, "torch._utils": _TORCH_UTILS})
            yield
        finally:
            for name, module in saved.items():
                sys.modules.pop(name, None)
                if module is not None:
                    sys.modules[name] = module


class _StorageRef(NamedTuple):
    storage_type: type
    key: str
    numel: int


class _TorchPickler(pickle.Pickler):
    """Pickles arrays as torch tensors, collecting their storages in ``storages``."""

    def __init__(self, file: io.BytesIO, path: PathLike) -> None:
        super().__init__(file, protocol=2)
        self._path = path
        self.storages: list[tuple[str, np.ndarray]] = []  # (key, C-contiguous array)

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Placeholder):
            fix = "Replace it with plain data (dicts, lists, numbers, strings, arrays)"
            raise _error(self._path, f"cannot save a Placeholder for {obj.module}.{obj.name}", fix)
        if isinstance(obj, (type, str, bytes)) or not hasattr(obj, "__array__"):
            return NotImplemented
        array = np.asarray(obj)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if (storage_name := _STORAGE_NAMES.get(array.dtype)) is None:
            fix = f"Cast it to one of {', '.join(map(str, _STORAGE_NAMES))}"
            raise _error(self._path, f"cannot save an array of dtype {array.dtype}", fix)
        stored = np.ascontiguousarray(array)  # one storage per array, as a C-contiguous copy if needed
        key = str(len(self.storages))
        self.storages.append((key, stored))
        ref = _StorageRef(getattr(_TORCH, storage_name), key, stored.size)
        strides = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
        hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
        return _TORCH_UTILS._rebuild_tensor_v2, (ref, 0, array.shape, strides, False, hooks)


def save(path: PathLike, obj: Any) -> None:
    """Saves ``obj`` in the ``torch.save`` zip format, without torch.

    Arrays (NumPy arrays and scalars, and anything with ``__array__`` such as
    ``jax.Array``) become C-contiguous CPU tensors, each with its own storage.
    ``torch.load(path, weights_only=True)`` reads the file if ``obj`` holds only
    dicts, OrderedDicts, lists, tuples, numbers, strings, None and arrays. The file
    is replaced atomically (temporary file, then rename).

    Args:
        path: Destination file.
        obj: The object tree to save.

    Raises:
        CheckpointFormatError: An array has an unsupported dtype, or ``obj`` holds a
            :class:`Placeholder`.
    """
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer, path)
    with _torch_stand_ins():
        pickler.dump(obj)
    records: list[tuple[str, bytes | np.ndarray]] = [("data.pkl", buffer.getvalue())]
    records.append(("byteorder", sys.byteorder.encode()))
    records += [(f"data/{key}", stored.reshape(-1).view(np.uint8)) for key, stored in pickler.storages]
    records.append(("version", b"3\n"))

    def write(file):
        with zipfile.ZipFile(file, "w") as archive:
            for name, data in records:
                info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                info.file_size = len(data)  # lets zipfile pick zip64 for records over 2 GiB
                with archive.open(info, "w") as record:
                    record.write(data)

    atomic_write(path, write)


def save_state_dict(path: PathLike, state_dict: Mapping[str, Any]) -> None:
    """Saves ``{name: array}`` so that ``torch.load`` returns an OrderedDict of tensors.

    Args:
        path: Destination file.
        state_dict: Parameter names to arrays (NumPy, JAX or anything ``np.asarray`` accepts).

    Raises:
        TypeError: A key is not a string.
        CheckpointFormatError: A value has an unsupported dtype.
    """
    if bad := [key for key in state_dict if not isinstance(key, str)]:
        raise TypeError(f"state_dict keys must be strings, got {bad[:5]!r}")
    save(path, collections.OrderedDict((key, np.asarray(value)) for key, value in state_dict.items()))
