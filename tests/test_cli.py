"""The shared command-line error style (``hmar_jax/cli.py``) and atomic outputs
(``hmar_jax/atomic_io.py``)."""

import os
import socket
import subprocess
import sys

import pytest

from hmar_jax import atomic_io, cli


def test_run_turns_input_errors_into_one_line_and_exit_2(capsys):
    def bad(argv):
        raise cli.InputError("--num 0 is out of range;\n give 1..9.")

    assert cli.run(bad, []) == 2
    assert capsys.readouterr().err == "error: --num 0 is out of range; give 1..9.\n"
    assert cli.run(lambda argv: 0, []) == 0

    def bug(argv):
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        cli.run(bug, [])


def test_os_errors_name_the_file(capsys, tmp_path):
    def missing(argv):
        open(tmp_path / "nope.npz")

    assert cli.run(missing, []) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.npz'}: No such file or directory\n"


def test_a_config_files_traceback_is_cut_to_its_message():
    text = ("flag --config=configs/x.py:fast: Error whilst parsing config file: Traceback (most "
            "recent call last): File \"a.py\", line 3, in parse config = get_config() File "
            "\"configs/x.py\", line 70, in get_config raise ValueError(f\"...\") ValueError: "
            "Unknown config argument 'fast'; use 'runlocal' or nothing. ")
    assert cli._innermost_message(text) == (
        "flag --config=configs/x.py:fast: Unknown config argument 'fast'; use 'runlocal' or "
        "nothing.")
    assert cli._innermost_message("flag --seed=x: not an int") == "flag --seed=x: not an int."


def test_unknown_override_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hmar_jax.train", "--config", "configs/demo.py", "--workdir",
         str(tmp_path / "w"), "--config.seed=3", "--config.data.colour=1"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.data.colour: the config has no key 'colour'; check the spelling "
        "against the config file.")
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


def test_writable_output_checks(tmp_path):
    nested = tmp_path / "a" / "b" / "out.npz"
    assert cli.check_writable_output(nested, overwrite=False) == nested
    assert not (tmp_path / "a").exists()  # checked, nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(cli.InputError, match="is a file, not a directory; choose another --out"):
        cli.check_writable_output(tmp_path / "file" / "out.npz", overwrite=False)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        cli.check_writable_output(tmp_path / "file", overwrite=False, flag="--out")
    assert cli.check_writable_output(tmp_path / "file", overwrite=True) == tmp_path / "file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


def test_atomic_write_without_overwrite_never_replaces(tmp_path):
    path = tmp_path / "samples.npz"
    atomic_io.atomic_write(path, lambda f: f.write(b"first"), overwrite=False)
    with pytest.raises(FileExistsError, match="created by another process"):
        atomic_io.atomic_write(path, lambda f: f.write(b"second"), overwrite=False)
    assert path.read_bytes() == b"first"
    atomic_io.atomic_write(path, lambda f: f.write(b"third"))
    assert path.read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_atomic_directory_removes_a_dead_writers_staging_only(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    dead = tmp_path / f".out.partial-{host}-pid{finished.pid}-0000beef"
    alive = tmp_path / f".out.partial-{host}-pid{os.getpid()}-0000cafe"
    other_host = tmp_path / f".out.partial-elsewhere-pid{finished.pid}-0000f00d"
    for folder in (dead, alive, other_host):
        folder.mkdir()
    with atomic_io.atomic_directory(tmp_path / "out") as staging:
        (staging / "params").write_text("done")
    assert (tmp_path / "out" / "params").read_text() == "done"
    assert not dead.exists() and alive.exists() and other_host.exists()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_io.atomic_directory(tmp_path / "out"):
            pass
