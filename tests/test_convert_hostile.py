"""`python -m hmar_jax.convert` on hostile and broken inputs: bounded memory, one-line errors,
no output left behind, output location checked first, staging left by a killed run removed."""

import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np
import pytest
from test_torch_pickle import tensor, write_archive

import hmar_jax
from hmar_jax import checkpointing
from hmar_jax.convert import torch_pickle
from hmar_jax.convert import vqvae as vqvae_convert
from hmar_jax.convert.__main__ import main as convert_main
from hmar_jax.tokenizer.model import VQVAEConfig

# A normal conversion of the small fixture VQ-VAE (an 18 MB .pth) peaks at about 300 MB
# resident (the JAX and Orbax imports are most of it); refusing a hostile file must cost no
# more than that, with margin.
PEAK_RSS_BOUND_MB = 600
FLOAT = ("torch", "FloatStorage")
GIB = 1 << 30


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of ``size`` zero bytes (a multiple of 1 MiB), about 1000x smaller:
    one full-flushed block of 1 MiB repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size >> 20) + compressor.flush()


def write_zip(path: pathlib.Path, records: dict[str, tuple[bytes, int, int]]) -> None:
    """A zip whose records are ``name: (payload, method, declared size)``, headers written by
    hand so that a declared size may differ from what the payload inflates to."""
    local, central = b"", b""
    for name, (payload, method, size) in records.items():
        encoded, crc = name.encode(), zlib.crc32(payload) if method == zipfile.ZIP_STORED else 0
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                             len(payload), size, len(encoded), 0) + encoded + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc,
                               len(payload), size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central),
                      len(local), 0)
    path.write_bytes(local + central + end)


def pickled_state_dict(items: dict[str, bytes]) -> bytes:
    return b"\x80\x02}(" + b"".join(
        b"X" + struct.pack("<I", len(k)) + k.encode() + v for k, v in items.items()) + b"u."


def stride_zero(path):
    """Under 1 KB: one stored float declared as a 2 GiB tensor by strides (0, 0)."""
    view = tensor(FLOAT, "0", 1, 0, (32768, 16384), (0, 0))
    write_archive(path, {"encoder.conv_in.weight": view}, {"0": bytes(4)})


def overlapping(path):
    """256 KiB of floats declared as a 2 GiB tensor whose rows overlap (strides (1, 1))."""
    view = tensor(FLOAT, "0", 65536, 0, (16384, 32768), (1, 1))
    write_archive(path, {"encoder.conv_in.weight": view}, {"0": bytes(4 * 65536)})


def deflate_bomb(path):
    """1 MB whose storage record honestly declares the 1 GiB it inflates to."""
    view = tensor(FLOAT, "0", GIB // 4, 0, (GIB // 4,), (1,))
    pickle = pickled_state_dict({"encoder.conv_in.weight": view})
    write_zip(path, {"ckpt/data.pkl": (pickle, zipfile.ZIP_STORED, len(pickle)),
                     "ckpt/data/0": (deflated_zeros(GIB), zipfile.ZIP_DEFLATED, GIB)})


def tiny_vqvae_state_dict() -> dict[str, np.ndarray]:
    """Zeros in the layout of a small VQ-VAE (convert with --norm-groups 4)."""
    cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                      norm_groups=4)
    return {key: np.zeros(shape, np.float32)
            for key, (_, shape) in vqvae_convert.expected_layout(cfg).items()}


def lying_deflate_bomb(path):
    """1 MB: a valid small VQ-VAE file whose codebook record declares its true size but
    inflates to 1 GiB, so that it is only met when the checked layout is read."""
    state_dict = tiny_vqvae_state_dict()
    good = path.with_name("good.pth")
    torch_pickle.save_state_dict(good, state_dict)
    codebook = f"archive/data/{list(state_dict).index('quantize.embedding.weight')}"
    with zipfile.ZipFile(good) as archive:
        records = {info.filename: (archive.read(info), zipfile.ZIP_STORED, info.file_size)
                   for info in archive.infolist()}
    records[codebook] = (deflated_zeros(GIB), zipfile.ZIP_DEFLATED, records[codebook][2])
    write_zip(path, records)
    good.unlink()


def pickle_bomb(path):
    """1 MB whose data.pkl record inflates to 1 GiB."""
    write_zip(path, {"ckpt/data.pkl": (deflated_zeros(GIB), zipfile.ZIP_DEFLATED, GIB)})


HOSTILE = {  # builder -> words the one-line error must contain
    "stride-zero": (stride_zero, "stride 0, a broadcast view"),
    "overlapping": (overlapping, "overlaps itself"),
    "deflate-bomb": (deflate_bomb, "compression bomb"),
    "lying-deflate-bomb": (lying_deflate_bomb, "is corrupt"),
    "pickle-bomb": (pickle_bomb, "compression bomb"),
}


# Runs the converter's __main__ and, however it ends, writes the process's own peak resident
# memory (VmHWM of its address space) to the file named by its first argument. wait4's
# ru_maxrss is no measure here: a child spawned by vfork carries its parent's high-water mark
# across exec, so it would report the test process's memory.
_MEASURED_CONVERT = """
import runpy, sys
peak_file = sys.argv.pop(1)
try:
    runpy.run_module("hmar_jax.convert", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(peak_file, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def convert_in_subprocess(*args: str) -> tuple[int, str, float]:
    """Runs ``python -m hmar_jax.convert ARGS``; returns its exit status, stderr and peak
    resident memory in MB (the converter process's own)."""
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(hmar_jax.__file__).parents[1]))
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = pathlib.Path(scratch) / "peak_kb"
        process = subprocess.run([sys.executable, "-c", _MEASURED_CONVERT, str(peak_file), *args],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak_kb = float(peak_file.read_text())
    return process.returncode, process.stderr.decode(), peak_kb / 1024


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in stderr, stderr


def assert_nothing_written(directory: pathlib.Path, out_name: str = "out") -> None:
    assert not (directory / out_name).exists()
    assert not [p.name for p in directory.iterdir() if p.name.startswith(f".{out_name}.")]


@pytest.mark.parametrize(("build", "words"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_file_is_refused_in_bounded_memory(tmp_path, build, words):
    src = tmp_path / "hostile.pth"
    build(src)
    assert src.stat().st_size < 2 << 20
    status, stderr, peak_mb = convert_in_subprocess("vqvae", "--src", str(src), "--norm-groups",
                                                    "4", "--out", str(tmp_path / "out"))
    assert peak_mb < PEAK_RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"
    assert status == 2
    assert_one_line_error(stderr, "hostile.pth", words)
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_normal_conversion_stays_within_the_bound(tmp_path, vqvae_state_dict):
    src = tmp_path / "vae.pth"
    torch_pickle.save_state_dict(src, vqvae_state_dict)
    status, stderr, peak_mb = convert_in_subprocess("vqvae", "--src", str(src),
                                                    "--out", str(tmp_path / "out"))
    assert (status, stderr) == (0, "")
    assert peak_mb < PEAK_RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["ch"] == 32


def good_pth(path, vqvae_state_dict):
    torch_pickle.save_state_dict(path, vqvae_state_dict)
    return path


def bad_crc(path, vqvae_state_dict):
    good_pth(path, vqvae_state_dict)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data/0")
    data[info.header_offset + 30 + len(info.filename) + 8] ^= 0xFF
    path.write_bytes(bytes(data))


BROKEN = {  # builder -> words the one-line error must contain
    "truncated": (lambda p, sd: p.write_bytes(good_pth(p, sd).read_bytes()[:100_000]),
                  "truncated or corrupt zip"),
    "cut-after-the-directory": (lambda p, sd: p.write_bytes(good_pth(p, sd).read_bytes()[:-23]),
                                "truncated or corrupt zip"),
    "not-zip": (lambda p, sd: p.write_bytes(b"hello, not a checkpoint\n" * 10), "not a zip archive"),
    "empty": (lambda p, sd: p.write_bytes(b""), "is empty"),
    "legacy-pickle": (lambda p, sd: p.write_bytes(b"\x80\x02}q\x00."), "legacy (pre-1.6)"),
    "missing-storage": (lambda p, sd: write_archive(p, {"w": tensor(FLOAT, "7", 4, 0, (4,), (1,))}, {}),
                        "record 'ckpt/data/7' is missing"),
    "storage-too-long": (lambda p, sd: write_archive(p, {"w": tensor(FLOAT, "0", 4, 0, (4,), (1,))},
                                                     {"0": bytes(20)}),
                         "holds 20 bytes, not 4 elements of float32 (16 bytes)"),
    "eof-in-pickle": (lambda p, sd: write_zip(p, {"ckpt/data.pkl": (b"\x80\x02}(X", 0, 5)}),
                      "data.pkl could not be unpickled"),
    "not-a-state-dict": (lambda p, sd: write_zip(p, {"ckpt/data.pkl": (b"\x80\x02K\x07.", 0, 5)}),
                         "not a mapping of names to arrays"),
}


@pytest.mark.parametrize("kind", ["vqvae", "hmar", "var", "inception"])
@pytest.mark.parametrize(("build", "words"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_file_is_one_line_error(tmp_path, capsys, vqvae_state_dict, kind, build, words):
    src = tmp_path / "broken.pth"
    build(src, vqvae_state_dict)
    assert convert_main([kind, "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "broken.pth", words)
    assert_nothing_written(tmp_path)


def test_corrupt_tensor_bytes_are_found_when_read(tmp_path, capsys, vqvae_state_dict):
    src = tmp_path / "broken.pth"
    bad_crc(src, vqvae_state_dict)
    assert convert_main(["vqvae", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "broken.pth", "'archive/data/0' is corrupt",
                          "Bad CRC-32")
    assert_nothing_written(tmp_path)


def unwritable_out(kind, tmp_path):
    if kind == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out", "is a file, not a directory"
    (tmp_path / "read-only").mkdir(mode=0o555)
    return tmp_path / "read-only" / "out", "cannot write in"


@pytest.mark.parametrize("kind", [
    "parent-is-a-file",
    pytest.param("read-only", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="permission bits do not stop root from writing")),
])
def test_unwritable_out_is_refused_before_the_source_is_read(tmp_path, capsys, vqvae_state_dict, kind):
    out, words = unwritable_out(kind, tmp_path)
    src = good_pth(tmp_path / "vae.pth", vqvae_state_dict)
    assert convert_main(["vqvae", "--src", str(src), "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--out", words)
    # Checked first: with a source that does not even exist, the output is what is reported.
    assert convert_main(["hmar", "--src", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--out", words)
    assert not out.exists()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_staging_of_a_killed_run_is_removed_by_the_next(tmp_path, capsys, vqvae_state_dict):
    src = good_pth(tmp_path / "vae.pth", vqvae_state_dict)
    stale = tmp_path / f".out.partial-{socket.gethostname()}-pid{dead_pid()}-1234abcd"
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "half-written").write_bytes(bytes(1 << 20))
    assert convert_main(["vqvae", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vae.pth"]
    tokenizer = checkpointing.load_tokenizer(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(tokenizer.quantize.embedding.embedding[...]),
                                  vqvae_state_dict["quantize.embedding.weight"])
