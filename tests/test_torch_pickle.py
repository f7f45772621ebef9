"""Tests for the torch-free torch.save reader/writer (cross-checked against real torch separately)."""

import argparse
import collections
import contextlib
import io
import os
import re
import struct
import sys
import types
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hmar_jax.convert import torch_pickle as tp

SAVABLE_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.complex64,
    np.complex128,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.bool_,
]


def assert_same(expected, actual):
    expected = np.asarray(expected)
    assert isinstance(actual, np.ndarray)
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    assert actual.flags.c_contiguous
    assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


def npz_bytes():
    buffer = io.BytesIO()
    np.savez(buffer, w=np.ones(2))
    return buffer.getvalue()


def rewrite(source, target, transform):
    """Copies a zip, passing each record through transform(name, data) -> data (None drops it)."""
    with zipfile.ZipFile(source) as inp, zipfile.ZipFile(target, "w") as out:
        for name in inp.namelist():
            data = transform(name, inp.read(name))
            if data is not None:
                out.writestr(name, data)


# Hand-written pickle opcodes (protocol 2), to build archives the way torch does without using our writer.
def text(value):
    return b"X" + struct.pack("<I", len(value.encode())) + value.encode()


def integer(value):
    return b"J" + struct.pack("<i", value)


def global_(module, name):
    return f"c{module}\n{name}\n".encode()


def tensor(storage_type, key, numel, offset, size, stride, dtype=None):
    """Opcodes for a torch tensor; with ``dtype`` (a torch dtype name) it uses _rebuild_tensor_v3."""
    storage_id = text("storage") + global_(*storage_type) + text(key) + text("cpu") + integer(numel)
    size_and_stride = b"(" + b"".join(map(integer, size)) + b"t(" + b"".join(map(integer, stride)) + b"t"
    hooks = global_("collections", "OrderedDict") + b")R"
    rebuild = global_("torch._utils", "_rebuild_tensor_v3" if dtype else "_rebuild_tensor_v2")
    args = b"((" + storage_id + b"tQ" + integer(offset) + size_and_stride + b"\x89" + hooks
    return rebuild + args + (global_("torch", dtype) if dtype else b"") + b"tR"


def write_archive(path, items, records):
    """A torch-style archive whose data.pkl is the dict {name: opcodes} of ``items``."""
    body = b"}(" + b"".join(text(name) + opcodes for name, opcodes in items.items()) + b"u"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ckpt/data.pkl", b"\x80\x02" + body + b".")
        for key, data in records.items():
            archive.writestr(f"ckpt/data/{key}", data)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.pth"
    tp.save_state_dict(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)})
    return path


@pytest.mark.parametrize("dtype", SAVABLE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    values = (np.arange(-6, 6).reshape(3, 4) % 7).astype(dtype)
    state = {
        "matrix": values,
        "transposed": values.T,  # saved as a C-contiguous copy
        "scalar": values[1, 2].copy().reshape(()),
        "empty": np.zeros((0, 2), dtype),
    }
    tp.save_state_dict(tmp_path / "x.pth", state)
    loaded = tp.load_state_dict(tmp_path / "x.pth")
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert_same(value, loaded[key])


def test_nested_checkpoint_with_placeholder(tmp_path):
    weights = collections.OrderedDict(w=np.ones((2, 2), ml_dtypes.bfloat16), step=np.int64(5))
    checkpoint = {
        "epoch": 3,
        "trainer": {"transformer_wo_ddp": weights, "history": [1.5, None, "x", (1, 2)]},
        "args": argparse.Namespace(lr=0.1, name="run"),
        "meters": collections.defaultdict(list, {"loss": [0.5]}),
    }
    tp.save(tmp_path / "ckpt.pth", checkpoint)
    loaded = tp.load(tmp_path / "ckpt.pth")
    assert loaded["epoch"] == 3
    assert loaded["trainer"]["history"] == [1.5, None, "x", (1, 2)]
    assert type(loaded["trainer"]["transformer_wo_ddp"]) is collections.OrderedDict
    assert_same(weights["w"], loaded["trainer"]["transformer_wo_ddp"]["w"])
    assert_same(np.array(5), loaded["trainer"]["transformer_wo_ddp"]["step"])
    args = loaded["args"]
    assert isinstance(args, tp.Placeholder) and type(args).__name__ == "Namespace"
    assert (args.module, args.name, args.state) == ("argparse", "Namespace", {"lr": 0.1, "name": "run"})
    meters = loaded["meters"]
    assert (meters.module, meters.name, meters.items) == ("collections", "defaultdict", {"loss": [0.5]})

    state_dict = tp.load_state_dict(tmp_path / "ckpt.pth", subtree="trainer/transformer_wo_ddp")
    assert type(state_dict) is dict and list(state_dict) == ["w", "step"]
    keys = r"keys \['epoch', 'trainer', 'args', 'meters'\]"
    with pytest.raises(tp.CheckpointFormatError, match=keys + r".*'trainer/transformer_wo_ddp'"):
        tp.load_state_dict(tmp_path / "ckpt.pth")
    with pytest.raises(tp.CheckpointFormatError, match=r"subtree 'trainer/model' not found.*'history'"):
        tp.load_state_dict(tmp_path / "ckpt.pth", subtree="trainer/model")
    with pytest.raises(tp.CheckpointFormatError, match=r"cannot save a Placeholder for argparse\.Namespace"):
        tp.save(tmp_path / "again.pth", loaded)


def test_views_sharing_one_storage(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    float_storage = ("torch", "FloatStorage")
    items = {
        "base": tensor(float_storage, "0", 24, 0, (4, 6), (6, 1)),
        "transposed": tensor(float_storage, "0", 24, 0, (6, 4), (1, 6)),
        "strided": tensor(float_storage, "0", 24, 7, (3, 3), (6, 2)),
        "size_one_dims": tensor(float_storage, "0", 24, 2, (1, 4, 1), (0, 1, 99)),
        "param": global_("torch._utils", "_rebuild_parameter")
        + b"("
        + tensor(float_storage, "0", 24, 18, (6,), (1,))
        + b"\x88"
        + global_("collections", "OrderedDict")
        + b")RtR",
    }
    write_archive(tmp_path / "views.pth", items, {"0": base.tobytes()})
    loaded = tp.load(tmp_path / "views.pth")
    expected = {
        "base": base,
        "transposed": base.T,
        "strided": base[1:, 1::2],
        "size_one_dims": base.ravel()[2:6].reshape(1, 4, 1),
        "param": base[3],
    }
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert_same(value, loaded[key])



REFUSED_VIEWS = {  # (offset, size, stride) of a view of 24 float32 elements -> message
    "too-far": (20, (2, 3), (3, 1), "'ckpt/data/0' has 96 bytes; a float32 tensor of shape (2, 3)"),
    "broadcast": (2, (3, 4), (0, 1), "repeats elements (stride 0, a broadcast view)"),
    "overlapping": (0, (4, 6), (1, 1), "overlaps itself"),
    "overlapping-transposed": (0, (6, 4), (1, 3), "overlaps itself"),
    "negative": (0, (4,), (-1,), "invalid tensor layout"),
}


@pytest.mark.parametrize(("offset", "size", "stride", "message"), REFUSED_VIEWS.values(),
                         ids=REFUSED_VIEWS.keys())
def test_views_that_repeat_or_leave_their_storage_are_refused(tmp_path, offset, size, stride, message):
    path = tmp_path / "view.pth"
    view = tensor(("torch", "FloatStorage"), "0", 24, offset, size, stride)
    write_archive(path, {"w": view}, {"0": np.arange(24, dtype=np.float32).tobytes()})
    with pytest.raises(tp.CheckpointFormatError, match=re.escape(message)):
        tp.load(path)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"])
def test_reads_untyped_storage_dtypes(tmp_path, dtype):
    values = np.arange(1, 7).astype(getattr(ml_dtypes, dtype, None) or np.dtype(dtype)).reshape(2, 3)
    untyped = ("torch.storage", "UntypedStorage")
    items = {"w": tensor(untyped, "0", values.nbytes, 0, (3, 2), (1, 3), dtype)}
    write_archive(tmp_path / "v3.pth", items, {"0": values.tobytes()})
    assert_same(values.T, tp.load(tmp_path / "v3.pth")["w"])
    with pytest.raises(tp.CheckpointFormatError, match=f"cannot save an array of dtype {dtype}.*Cast it"):
        tp.save(tmp_path / "out.pth", values)


def test_archive_layout_and_array_likes(tmp_path):
    tp.save_state_dict(tmp_path / "x.pth", {"jax": jnp.arange(3.0), "big_endian": np.arange(4, dtype=">i4")})
    with zipfile.ZipFile(tmp_path / "x.pth") as archive:
        assert archive.namelist()[0] == "archive/data.pkl"
        assert archive.read("archive/version") == b"3\n"
        assert archive.read("archive/byteorder") == sys.byteorder.encode()
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    loaded = tp.load_state_dict(tmp_path / "x.pth")
    assert_same(np.arange(3.0, dtype=np.float32), loaded["jax"])
    assert_same(np.arange(4, dtype=np.int32), loaded["big_endian"])


def test_big_endian_records_and_any_archive_name(tmp_path):
    state = {
        "f": np.linspace(-1, 1, 6).astype(np.float32),
        "c": np.array([1 + 2j]),
        "bf": np.ones(2, ml_dtypes.bfloat16),
    }
    tp.save_state_dict(tmp_path / "little.pth", state)
    widths = {"0": 4, "1": 8, "2": 2}  # bytes per (real) component of f, c, bf

    def to_big_endian(name, data):
        if name.endswith("byteorder"):
            return b"big"
        if "/data/" in name:
            width = widths[name.rsplit("/", 1)[-1]]
            return np.frombuffer(data, np.uint8).reshape(-1, width)[:, ::-1].tobytes()
        return data

    rewrite(tmp_path / "little.pth", tmp_path / "big.pth", to_big_endian)
    with zipfile.ZipFile(tmp_path / "big.pth") as inp, zipfile.ZipFile(tmp_path / "renamed.pth", "w") as out:
        for name in inp.namelist():
            out.writestr(name.replace("archive/", "my_model/", 1), inp.read(name))
    for name in ("big.pth", "renamed.pth"):
        loaded = tp.load_state_dict(tmp_path / name)
        for key, value in state.items():
            assert_same(value, loaded[key])


MARKER = "pwned-marker"  # each payload below would create this file if it ran
MALICIOUS = {  # data.pkl entries that would run code under pickle.load
    "os.system": global_("os", "system") + text(f"touch {MARKER}") + b"\x85R",
    "posix.system": global_("posix", "system") + text(f"touch {MARKER}") + b"\x85R",
    "subprocess": global_("subprocess", "check_call") + b"(" + text("touch") + text(MARKER) + b"l\x85R",
    "eval": global_("builtins", "eval") + text(f"open({MARKER!r}, 'w')") + b"\x85R",
    "exec": global_("builtins", "exec") + text(f"open({MARKER!r}, 'w')") + b"\x85R",
    "open": global_("io", "open") + text(MARKER) + text("w") + b"\x86R",
    "import-chain": global_("builtins", "getattr") + global_("builtins", "__import__") + text("os")
    + b"\x85R" + text("system") + b"\x86R" + text(f"touch {MARKER}") + b"\x85R",
    "stack-global": b"\x8c\x02os\x8c\x06system\x93" + text(f"touch {MARKER}") + b"\x85R",
    "inst-opcode": b"(" + text(f"touch {MARKER}") + b"ios\nsystem\n",
    "obj-opcode": b"(" + global_("os", "system") + text(f"touch {MARKER}") + b"o",
    "class-instance": global_("zipfile", "ZipFile") + text(MARKER) + text("w") + b"\x86R",
    "partial": global_("functools", "partial") + global_("os", "system") + text(f"touch {MARKER}")
    + b"\x86R)R",
}


@pytest.mark.parametrize("payload", MALICIOUS.values(), ids=MALICIOUS.keys())
def test_restricted_unpickler_runs_and_imports_nothing(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    write_archive(tmp_path / "evil.pth", {"obj": payload}, {})
    modules = set(sys.modules)
    with contextlib.suppress(tp.CheckpointFormatError):  # e.g. calling a Placeholder is refused
        assert isinstance(tp.load(tmp_path / "evil.pth")["obj"], tp.Placeholder)
    assert os.listdir(tmp_path) == ["evil.pth"]  # nothing ran, nothing was written
    assert set(sys.modules) == modules  # nothing was imported


def test_placeholder_records_what_would_have_run(tmp_path):
    write_archive(tmp_path / "evil.pth", {"cmd": MALICIOUS["os.system"]}, {})
    command = tp.load(tmp_path / "evil.pth")["cmd"]
    assert (command.module, command.name, command.args) == ("os", "system", (f"touch {MARKER}",))


def test_tensors_may_not_reuse_storage_over_and_over(tmp_path):
    views = {f"w{i}": tensor(("torch", "FloatStorage"), "0", 1 << 18, 0, (1 << 18,), (1,)) for i in range(4)}
    write_archive(tmp_path / "aliased.pth", dict(list(views.items())[:2]), {"0": bytes(1 << 20)})
    tied = tp.load(tmp_path / "aliased.pth")  # two views of one storage: tied weights
    assert set(tied) == {"w0", "w1"} and tied["w1"].shape == (1 << 18,)
    write_archive(tmp_path / "aliased.pth", views, {"0": bytes(1 << 20)})
    with pytest.raises(tp.CheckpointFormatError, match=r"view the same stored bytes over and over "
                                                      r"\(4194304 bytes of tensors from 1048576"):
        tp.load(tmp_path / "aliased.pth")


def test_open_state_dict_reads_nothing_until_asked(tmp_path, saved, monkeypatch):
    reads = []
    monkeypatch.setattr(tp._Archive, "storage_bytes", lambda self, storage: reads.append(storage)
                        or bytearray(storage.nbytes))
    with tp.open_state_dict(saved) as state_dict:
        assert {k: (v.shape, v.dtype) for k, v in state_dict.items()} == {
            "w": ((2, 3), np.float32), "b": ((3,), np.int64)}
        assert reads == []
        assert np.asarray(state_dict["b"], np.float32).dtype == np.float32
    assert len(reads) == 1


def test_save_restores_sys_modules(tmp_path, monkeypatch):
    sentinel = types.ModuleType("torch")
    monkeypatch.setitem(sys.modules, "torch", sentinel)
    monkeypatch.delitem(sys.modules, "torch._utils", raising=False)
    tp.save(tmp_path / "a.pth", {"x": np.ones(2)})
    with pytest.raises(tp.CheckpointFormatError):  # raised while the stand-ins are installed
        tp.save(tmp_path / "b.pth", {"x": np.ones(2), "bad": np.array([object()])})
    assert sys.modules["torch"] is sentinel and "torch._utils" not in sys.modules


def test_save_is_atomic(saved, monkeypatch):
    before = saved.read_bytes()

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        tp.save_state_dict(saved, {"w": np.zeros(3)})
    with pytest.raises(tp.CheckpointFormatError, match="cannot save an array of dtype <U1"):
        tp.save_state_dict(saved, {"w": np.array(["a"])})
    with pytest.raises(TypeError, match="keys must be strings"):
        tp.save_state_dict(saved, {1: np.zeros(3)})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


ERROR_CASES = {
    "missing": (lambda p, s: None, ["no such file", "Check the path"]),
    "directory": (lambda p, s: p.mkdir(), ["is a directory"]),
    "npz": (lambda p, s: p.write_bytes(npz_bytes()), ["NumPy .npz", "numpy.load"]),
    "random-bytes": (
        lambda p, s: p.write_bytes(b"just some text, not a checkpoint\n" * 4),
        ["not a zip archive", "legacy pre-1.6", "torch.save(obj, path)", "safetensors"],
    ),
    "legacy-pickle": (
        lambda p, s: p.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02"),
        ["legacy (pre-1.6)", "torch>=1.6"],
    ),
    "safetensors": (
        lambda p, s: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14),
        ["safetensors file", "safetensors.numpy.load_file"],
    ),
    "truncated": (
        lambda p, s: p.write_bytes(s.read_bytes()[: s.stat().st_size // 2]),
        ["truncated or corrupt zip", "Re-download", "torch.save"],
    ),
    "empty": (lambda p, s: p.write_bytes(b""), ["is empty", "Re-download"]),
    "no-data.pkl": (
        lambda p, s: rewrite(s, p, lambda n, d: None if n.endswith("data.pkl") else d),
        ["no '<archive>/data.pkl' entry", "archive/data/0"],
    ),
    "no-storage-record": (
        lambda p, s: rewrite(s, p, lambda n, d: None if n.endswith("data/0") else d),
        ["record 'archive/data/0' is missing", "Re-download"],
    ),
    "short-storage-record": (
        lambda p, s: rewrite(s, p, lambda n, d: d[:5] if n.endswith("data/0") else d),
        ["'archive/data/0' holds 5 bytes, not 6 elements of float32 (24 bytes)"],
    ),
    "long-storage-record": (
        lambda p, s: rewrite(s, p, lambda n, d: d + bytes(4) if n.endswith("data/0") else d),
        ["'archive/data/0' holds 28 bytes, not 6 elements of float32 (24 bytes)"],
    ),
    "oversized-data.pkl": (
        lambda p, s: rewrite(
            s, p, lambda n, d: d[:-1] + b" " * tp.PICKLE_LIMIT + b"." if n.endswith("data.pkl") else d),
        ["record 'archive/data.pkl' declares", "more than the 16777216"],
    ),
    "unsupported-storage": (
        lambda p, s: rewrite(s, p, lambda n, d: d.replace(b"FloatStorage", b"QUInt8Storage")),
        ["unsupported storage type torch.QUInt8Storage", "torch.FloatStorage"],
    ),
    "corrupt-pickle": (
        lambda p, s: rewrite(s, p, lambda n, d: d[:-3] if n.endswith("data.pkl") else d),
        ["data.pkl could not be unpickled", "Re-download"],
    ),
    "bad-byteorder": (
        lambda p, s: rewrite(s, p, lambda n, d: b"sideways" if n.endswith("byteorder") else d),
        ["unknown byte order 'sideways'"],
    ),
}


@pytest.mark.parametrize(("make", "words"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors(tmp_path, saved, make, words):
    path = tmp_path / "checkpoint.pth"
    make(path, saved)
    with pytest.raises(tp.CheckpointFormatError) as error:
        tp.load(path)
    message = str(error.value)
    assert message.startswith(str(path))
    for word in words:
        assert word in message


def test_crc_error_is_reported(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        info = archive.getinfo("archive/data/0")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 4] ^= 0xFF
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(tp.CheckpointFormatError, match=r"zip record 'archive/data/0' is corrupt.*CRC"):
        tp.load(corrupt)
