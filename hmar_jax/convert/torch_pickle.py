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
:class:`Placeholder` objects. :func:`save` writes files ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import collections
import contextlib
import io
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


def _swap_bytes(array: np.ndarray) -> None:
    """Reverses the byte order of each element (each complex component) of a C-contiguous array."""
    width = array.dtype.itemsize // (2 if array.dtype.kind == "c" else 1)
    if width > 1:
        array.reshape(-1).view(f"u{width}").byteswap(inplace=True)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` without importing anything, reading storages from the archive."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: PathLike) -> None:
        super().__init__(io.BytesIO(_read_record(archive, f"{prefix}/data.pkl", path)))
        self._archive, self._prefix, self._path = archive, prefix, path
        has_byteorder = f"{prefix}/byteorder" in archive.namelist()
        record = _read_record(archive, f"{prefix}/byteorder", path) if has_byteorder else b"little"
        byteorder = record.decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _error(path, f"record '{prefix}/byteorder' names an unknown byte order {byteorder!r}")
        self._swap = byteorder != sys.byteorder
        self._storages: dict[tuple[str, np.dtype], np.ndarray] = {}
        self._record_names: dict[int, str] = {}  # id(storage array) -> record name
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

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _error(self._path, f"data.pkl holds an unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            is_placeholder = isinstance(storage_type, type) and issubclass(storage_type, Placeholder)
            found = f"{storage_type.module}.{storage_type.name}" if is_placeholder else repr(storage_type)
            supported = ", ".join(f"torch.{name}" for name in [*_STORAGE_DTYPES, "UntypedStorage"])
            raise _error(self._path, f"unsupported storage type {found}", f"Supported: {supported}")
        name, dtype = f"{self._prefix}/data/{key}", storage_type.dtype
        if (name, dtype) not in self._storages:
            data = _read_record(self._archive, name, self._path)
            if len(data) < numel * dtype.itemsize:
                declared = f"{numel} elements of {dtype} ({numel * dtype.itemsize} bytes)"
                raise _error(self._path, f"storage record {name!r} holds {len(data)} bytes, not {declared}")
            self._storages[name, dtype] = array = np.frombuffer(data, dtype, count=numel)
            self._record_names[id(array)] = name
        return self._storages[name, dtype]

    def _rebuild_tensor_v2(self, storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> np.ndarray:
        return self._tensor(storage, getattr(storage, "dtype", None), offset, size, stride)

    def _rebuild_tensor_v3(
        self, storage: Any, offset: int, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_: Any
    ) -> np.ndarray:
        return self._tensor(storage, dtype, offset, size, stride)

    def _tensor(self, storage: Any, dtype: Any, offset: int, size: Any, stride: Any) -> np.ndarray:
        """Copies a tensor out of its storage; ``offset`` and ``stride`` count ``dtype`` elements."""
        name = self._record_names.get(id(storage))
        if name is None or not isinstance(dtype, np.dtype):
            raise _error(self._path, f"a tensor is built from {storage!r} with dtype {dtype!r}")
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
            raise _error(self._path, f"invalid tensor layout size={size} stride={stride} offset={offset}")
        if 0 in size:
            return np.zeros(size, dtype)
        needed = (offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))) * dtype.itemsize
        if needed > storage.nbytes:
            tensor = f"a {dtype} tensor of shape {size}, offset {offset} and strides {stride}"
            problem = f"storage record {name!r} has {storage.nbytes} bytes; {tensor} needs {needed}"
            raise _error(self._path, problem)
        strides = [s * dtype.itemsize for s in stride]
        array = np.ndarray(size, dtype, storage.view(np.uint8), offset * dtype.itemsize, strides).copy()
        if self._swap:
            _swap_bytes(array)
        return array


def _read_record(archive: zipfile.ZipFile, name: str, path: PathLike) -> bytes:
    try:
        return archive.read(name)
    except KeyError as exc:
        raise _error(path, f"record {name!r} is missing") from exc
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise _error(path, f"zip record {name!r} is corrupt ({exc})") from exc


def _open_archive(path: PathLike) -> zipfile.ZipFile:
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


def load(path: PathLike) -> Any:
    """Loads a ``torch.save`` checkpoint (zip format, torch>=1.6) without torch.

    Tensors and parameters become C-contiguous NumPy arrays (bfloat16 and float8 as
    ``ml_dtypes`` arrays), torch dtypes become NumPy dtypes, and other globals are
    never imported: they become :class:`Placeholder` objects.

    Args:
        path: The checkpoint file.

    Returns:
        The saved object tree, e.g. an ``OrderedDict`` of arrays.

    Raises:
        CheckpointFormatError: The file is missing, not a torch>=1.6 checkpoint, corrupt,
            or uses an unsupported storage type.
    """
    with _open_archive(path) as archive:
        unpickler = _RestrictedUnpickler(archive, _find_prefix(archive, path), path)
        try:
            return unpickler.load()
        except CheckpointFormatError:
            raise
        except Exception as exc:
            raise _error(path, f"data.pkl could not be unpickled ({type(exc).__name__}: {exc})") from exc


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    listing = ", ".join(map(repr, keys[:20])) + (", ..." if len(keys) > 20 else "")
    odd = [f"; {k!r} holds {type(v).__name__}" for k, v in obj.items() if not isinstance(v, np.ndarray)]
    return f"a {type(obj).__name__} with keys [{listing}]" + (odd[0] if odd else "")


def load_state_dict(path: PathLike, *, subtree: str | None = None) -> dict[str, np.ndarray]:
    """Loads a checkpoint holding a state_dict, as ``{name: array}``.

    Args:
        path: The checkpoint file.
        subtree: Slash-separated key path to a nested state_dict, e.g.
            ``"trainer/transformer_wo_ddp"`` in a training checkpoint.

    Returns:
        A plain dict from parameter names to NumPy arrays, in saved order.

    Raises:
        CheckpointFormatError: As :func:`load`, or the selected object is not a mapping
            of names to arrays (the message lists its keys).
    """
    obj, where = load(path), "the top-level object"
    for part in subtree.strip("/").split("/") if subtree else []:
        if not isinstance(obj, Mapping) or part not in obj:
            problem = f"subtree {subtree!r} not found: {where} is {_describe(obj)}, with no key {part!r}"
            raise _error(path, problem, "Pass a slash-separated path of existing keys")
        obj, where = obj[part], f"the object at subtree {subtree!r}"
    if isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(obj[k], np.ndarray) for k in obj):
        return dict(obj)
    fix = "A slash-separated subtree= path (e.g. 'trainer/transformer_wo_ddp') selects a nested state_dict"
    raise _error(path, f"{where} is {_describe(obj)}, not a mapping of names to arrays", fix)


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
