"""The Colab notebook runs end to end on the shipped digits bundle (code cells executed in
order in one namespace, the install cell included: it is a no-op where hmar_jax imports)."""

import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_sample_notebook_runs_on_the_digits_bundle(monkeypatch, capsys):
    notebook = json.loads((ROOT / "notebooks" / "sample.ipynb").read_text())
    monkeypatch.setenv("HMAR_CHECKPOINT", str(ROOT / "checkpoints" / "digits-demo"))
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__notebook__"}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines())
            exec(compile(source, f"sample.ipynb:{cell['id']}", "exec"), namespace)
    samples, labels = namespace["samples"], namespace["labels"]
    assert samples.shape == (80, 16, 16, 3) and samples.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 8))
    assert namespace["grid"].shape[2] == 3
    for name, region in (("inpainted", "hole"), ("outpainted", "centre"), ("class_edited", "left")):
        edits, regenerate = namespace[name], np.asarray(namespace[region])[0]
        assert edits.shape == (6, 16, 16, 3)
        # Outside the region every edit shows the same pixels (the source's reconstruction);
        # inside, the edits differ from each other.
        np.testing.assert_array_equal(edits[:, ~regenerate], np.broadcast_to(
            edits[:1, ~regenerate], edits[:, ~regenerate].shape))
        assert len({e[regenerate].tobytes() for e in edits}) > 1
    assert "devices:" in capsys.readouterr().out
