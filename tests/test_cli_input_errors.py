"""Bad input to the sample, edit, export and evaluate command lines: one ``error:`` line and
exit status 2, found before the work it would spoil (no bundle load, no sampling, no
Inception pass). Most cases stop before any weights are read; the rest load the shipped
``checkpoints/digits-demo`` bundle and stop before sampling."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from hmar_jax import edit, export, pretrained, sample, sampling
from hmar_jax.evaluate import digits, inception
from hmar_jax.evaluate.__main__ import main as evaluate_main

DEMO = pathlib.Path(__file__).parent.parent / "checkpoints" / "digits-demo"


class WorkStarted(Exception):
    """Raised by the stand-ins below: the command got past its input checks."""


@pytest.fixture
def no_work(monkeypatch):
    """Every slow step of the commands raises WorkStarted."""
    def refuse(*args, **kwargs):
        raise WorkStarted

    for module, name in [(pretrained, "load_pretrained"), (inception, "load_inception"),
                         (digits, "evaluate_samples"), (export, "export_workdir"),
                         (export, "export_pair"), (sampling, "generate_batches"),
                         (sampling, "edit")]:
        monkeypatch.setattr(module, name, refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def inputs(tmp_path):
    """A source image, digit samples and a blocker: a file where --out wants a folder."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src.png")
    images = np.zeros((12, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "digits.npz", images=images, labels=np.arange(12) % 10)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    (tmp_path / "blocker").write_text("a file, not a folder")
    return tmp_path


def commands(tmp: pathlib.Path, out: str) -> dict[str, list[str]]:
    image = ["--image", str(tmp / "src.png"), "--box", "0.25,0.25,0.75,0.75"]
    return {
        "sample": ["sample", "--checkpoint", str(DEMO), "--classes", "1", "--out", out + ".npz"],
        "edit": ["edit", "--checkpoint", str(DEMO), *image, "--out", out + ".png"],
        "export": ["export", "--workdir", str(tmp), "--out", out],
        "generate": ["generate", "--checkpoint", str(DEMO), "--preset", "default",
                     "--per-class", "1", "--out", out + ".npz"],
        "metrics": ["metrics", "--samples", str(tmp / "batch.npz"), "--ref",
                    str(tmp / "batch.npz"), "--inception", str(tmp), "--out", out + ".json"],
        "digits": ["digits", "--samples", str(tmp / "digits.npz"), "--out", out + ".json"],
    }


def run_command(argv: list[str]) -> int:
    mains = {"sample": sample.main, "edit": edit.main, "export": export.main}
    return mains[argv[0]](argv[1:]) if argv[0] in mains else evaluate_main(argv)


@pytest.mark.parametrize("command", ["sample", "edit", "export", "generate", "metrics", "digits"])
def test_an_out_under_a_file_is_refused_before_any_work(inputs, capsys, no_work, command):
    argv = commands(inputs, str(inputs / "blocker" / "result"))[command]
    assert run_command(argv) == 2
    err = one_error_line(capsys)
    assert f"--out {inputs / 'blocker' / 'result'}" in err and "is a file, not a directory" in err


@pytest.mark.parametrize("command, flag, value, allowed", [
    ("sample", "--num", 2**31, "1..2147483647"),
    ("sample", "--seed", 2**32, "-2147483648..2147483647"),  # would repeat seed 0's draws
    ("sample", "--seed", -2**31 - 1, "-2147483648..2147483647"),
    ("sample", "--batch-size", 0, "1..2147483647"),
    ("edit", "--seed", 10**30, "-2147483648..2147483647"),
    ("generate", "--seed", 2**40, "-2147483648..2147483647"),
    ("generate", "--per-class", 2**31, "1..2147483647"),
])
def test_counts_and_seeds_outside_int32_name_the_allowed_range(inputs, capsys, no_work, command,
                                                                flag, value, allowed):
    argv = commands(inputs, str(inputs / "result"))[command] + [flag, str(value)]
    assert run_command(argv) == 2
    assert f"{flag} {value} is out of range; give an integer in {allowed}." in one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--classes", "99999999999"], "Class id 99999999999 is out of range: this model has classes 0..9"),
    (["--classes", "3,-2147483649"], "Class id -2147483649 is out of range"),
])
def test_overflowing_class_ids_are_out_of_range_not_a_crash(tmp_path, capsys, monkeypatch,
                                                            argv, message):
    monkeypatch.setattr(sampling, "generate_batches", lambda *a, **k: pytest.fail("sampled"))
    code = sample.main(["--checkpoint", str(DEMO), "--out", str(tmp_path / "s.npz"), *argv])
    assert code == 2 and message in one_error_line(capsys)


# ----------------------------------------------------------------------------- manifests

VALID = json.loads((DEMO / pretrained.MANIFEST).read_text())


@pytest.mark.parametrize("change, message", [
    (lambda m: [m], "holds a JSON list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "model"},
     "'model' is null; it must name the bundle's model folder"),
    (lambda m: m | {"tokenizer": 3}, "'tokenizer' is 3; it must name the bundle's tokenizer folder"),
    (lambda m: m | {"sampling": m["sampling"] | {"top_q": 0.9}},
     "sampling has unknown keys ['top_q']; the keys are ['cfg', 'top_k', 'top_p'"),
    (lambda m: m | {"sampling": m["sampling"] | {"top_p": "0.9"}},
     'sampling.top_p is "0.9"; it must be a number in [0, 1]'),
    (lambda m: m | {"sampling": m["sampling"] | {"top_k": 2.5}},
     "sampling.top_k is 2.5; it must be an integer >= 0"),
    (lambda m: m | {"sampling": m["sampling"] | {"temperature": 0}},
     "sampling.temperature is 0; it must be a positive number"),
    (lambda m: m | {"sampling": m["sampling"] | {"mask_schedule": [[1], [1, "3"]]}},
     "sampling.mask_schedule is [[1], [1, \"3\"]]; it must be \"auto\", null, or a list of lists"),
    (lambda m: m | {"sampling": [5.0]}, "sampling is list [5.0]; it must be an object"),
])
def test_a_manifest_with_wrong_content_names_the_key(tmp_path, capsys, change, message):
    bundle = tmp_path / "bundle"  # the manifest alone: it is checked before any weights are read
    bundle.mkdir()
    (bundle / pretrained.MANIFEST).write_text(json.dumps(change(dict(VALID))))
    code = sample.main(["--checkpoint", str(bundle), "--classes", "1",
                        "--out", str(tmp_path / "s.npz")])
    err = one_error_line(capsys)
    assert code == 2 and message in err, err


def test_stored_sampling_configs_round_trip_through_the_checks():
    configs = [*sampling.PRESETS.values(), sampling.SamplingConfig(),
               sampling.SamplingConfig(mask_schedule=((1,), (1, 3)), mask_cfg=2.0, top_k=0)]
    for config in configs:
        assert pretrained.sampling_from_json(pretrained.sampling_to_json(config)) == config
    assert pretrained.sampling_from_json(VALID["sampling"]) == sampling.SamplingConfig(
        cfg=5.0, top_k=0, top_p=0.9, temperature=1.0, mask_schedule="auto", mask_cfg=2.0)


# ----------------------------------------------------------------------------- edit inputs

def bad_image_files(tmp_path) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (file, text the message must hold)."""
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    return {"text": (text, "cannot identify image file"), "empty": (empty, "cannot identify"),
            "truncated": (truncated, "truncated")}


@pytest.mark.parametrize("flag", ["--image", "--mask"])
@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "bomb"])
def test_unreadable_images_are_one_message_before_loading(tmp_path, capsys, monkeypatch, no_work,
                                                          flag, kind):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src.png")
    if kind == "bomb":  # over Pillow's decompression-bomb limit (lowered to keep the file small)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # refused above 600 pixels
        bad, detail = tmp_path / "bomb.png", "could be decompression bomb"
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad)
    else:
        bad, detail = bad_image_files(tmp_path)[kind]
    region = ["--mask", str(bad)] if flag == "--mask" else ["--box", "0,0,0.5,0.5"]
    image = bad if flag == "--image" else tmp_path / "src.png"
    code = edit.main(["--checkpoint", str(DEMO), "--image", str(image), *region,
                      "--out", str(tmp_path / "e.png")])
    err = one_error_line(capsys)
    assert code == 2 and f"{flag} {bad} is not a readable image" in err and detail in err, err
    assert "give a PNG or JPEG file" in err


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)  # every 8-bit level once
    Image.fromarray(levels * 257).save(tmp_path / "gradient16.png")  # 16-bit grey PNG
    with Image.open(tmp_path / "gradient16.png") as stored:
        assert stored.mode == "I;16"
    image = edit.read_image(str(tmp_path / "gradient16.png"), "--image", "RGB")
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], levels)
    mask = edit.read_image(str(tmp_path / "gradient16.png"), "--mask", "L")
    np.testing.assert_array_equal(mask, levels)
    half = np.full((16, 16), 40000, np.uint16)  # 61% grey: regenerated (>= 128 of 255)
    Image.fromarray(half).save(tmp_path / "mask16.png")
    assert (edit.fit_mask(edit.read_image(str(tmp_path / "mask16.png"), "--mask", "L"), 16)).all()
    assert edit.read_image(str(tmp_path / "mask16.png"), "--mask", "L")[0, 0] == round(40000 / 257)


@pytest.mark.parametrize("region, message", [
    (["--box", "0.5,0.5,0.52,0.52"], "covers no pixel of the 16x16 image"),
    (["--box", "0,0,1,1", "--mode", "outpaint"],
     "--box 0,0,1,1 with --mode outpaint regenerates no pixel of the 16x16 image"),
    (["--mask", "BLACK"], "regenerates no pixel of the 16x16 image"),
])
def test_edits_that_would_change_nothing_are_refused(tmp_path, capsys, monkeypatch, region,
                                                     message):
    monkeypatch.setattr(sampling, "edit", lambda *a, **k: pytest.fail("sampled"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black.png")
    region = [str(tmp_path / "black.png") if r == "BLACK" else r for r in region]
    code = edit.main(["--checkpoint", str(DEMO), "--image", str(tmp_path / "src.png"), *region,
                      "--out", str(tmp_path / "e.npz")])
    assert code == 2 and message in one_error_line(capsys)
    assert not (tmp_path / "e.npz").exists()


# ----------------------------------------------------------------------------- concurrent runs

def test_a_sample_written_meanwhile_by_another_run_is_not_replaced(tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "samples.npz"

    def other_run_finishes_first(model, vae, labels, sample_index, **kwargs):
        out.write_bytes(b"the other run's samples")
        return np.zeros((len(labels), 16, 16, 3), np.uint8)

    monkeypatch.setattr(sampling, "generate_batches", other_run_finishes_first)
    code = sample.main(["--checkpoint", str(DEMO), "--classes", "1", "--num", "1",
                        "--out", str(out)])
    err = one_error_line(capsys)
    assert code == 2 and "was created by another process while this one ran" in err, err
    assert "pass --overwrite" in err and out.read_bytes() == b"the other run's samples"
    assert capsys.readouterr().out == ""  # no "Wrote"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temporary left
    labels = np.array([1], np.int32)
    with pytest.raises(FileExistsError):
        sample.write_samples(out, np.zeros((1, 16, 16, 3), np.uint8), labels, labels, 1,
                             overwrite=False)
    sample.write_samples(out, np.full((1, 16, 16, 3), 7, np.uint8), labels, labels, 1,
                         overwrite=True)
    with np.load(out) as written:
        assert (written["images"] == 7).all()


def test_an_edit_that_keeps_nothing_is_done_with_a_warning(tmp_path, capsys, caplog, monkeypatch):
    seen = []

    def fake_edit(model, vae, images, regenerate, labels, sample_index, seed, config):
        seen.append(np.asarray(regenerate))
        return np.zeros(images.shape, np.float32)

    monkeypatch.setattr(sampling, "edit", fake_edit)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "src.png")
    code = edit.main(["--checkpoint", str(DEMO), "--image", str(tmp_path / "src.png"),
                      "--box", "0,0,1,1", "--num", "1", "--out", str(tmp_path / "e.npz")])
    assert code == 0 and "Wrote 1 edits" in capsys.readouterr().out
    assert seen[0].shape == (1, 16, 16) and seen[0].all()
    assert "--box 0,0,1,1 with --mode inpaint regenerates the whole 16x16 image" in caplog.text
