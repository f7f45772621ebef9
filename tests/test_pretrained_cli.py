"""Pretrained bundles: export from a workdir, load onto one device or a mesh with an
execution config, the shipped demo bundle, and the sample / edit command lines with their
error messages."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hmar_jax import checkpointing, edit, execution, export, pretrained, sample, sampling, sharding
from hmar_jax.execution import ExecutionConfig
from hmar_jax.training import trainer
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from tiny_runs import demo_config

ROOT = pathlib.Path(__file__).parent.parent
DEMO = ROOT / "checkpoints" / "digits-demo"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_export):
    """A 2-step stage-1 run and its bundle."""
    root = tmp_path_factory.mktemp("run")
    config = demo_config(**{"tokenizer.export": tokenizer_export, "num_train_steps": 2})
    trainer.Trainer(config, str(root / "workdir")).run()
    bundle = export.export_workdir(root / "workdir", root / "bundle")
    return root, bundle


def params(module) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(module, nnx.Param)))]


@pytest.mark.slow
def test_workdir_export_holds_the_ema_model_tokenizer_and_sampling(run, tokenizer_export):
    root, bundle = run
    loaded = pretrained.load_pretrained(bundle)
    final_export = checkpointing.load_hmar(root / "workdir" / "export")  # EMA at the last step
    for a, b in zip(params(loaded.model), params(final_export)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(params(loaded.vae), params(checkpointing.load_tokenizer(tokenizer_export))):
        np.testing.assert_array_equal(a, b)
    assert loaded.sampling.mask_schedule is None  # stage 1: no refinement
    assert loaded.sampling.cfg == demo_config().sampling.cfg
    assert loaded.metadata["source"] == {"workdir": "workdir", "stage": 1, "step": 2, "weights": "ema"}
    unstacked = pretrained.load_pretrained(bundle, ExecutionConfig(unstack_blocks=True)).model
    assert isinstance(unstacked.blocks, nnx.List) and len(unstacked.blocks) == loaded.model.config.depth
    assert isinstance(unstacked.mask_blocks, nnx.List)
    np.testing.assert_array_equal(unstacked.blocks[1].attn.mat_qkv.kernel[...],
                                  loaded.model.blocks.attn.mat_qkv.kernel[...][1])


@pytest.mark.slow
def test_the_execution_config_decides_the_weight_dtypes(run):
    """Matmul weights are stored in the resolved compute dtype (float32 on CPU by default)
    unless ``cast_weights`` is off; the heads keep float32."""
    _, bundle = run
    default = pretrained.load_pretrained(bundle).model
    assert default.execution == ExecutionConfig().resolve("cpu")
    assert default.blocks.ffn.fc1.kernel.dtype == jnp.float32
    half = pretrained.load_pretrained(bundle, execution.resolved("cpu", compute_dtype="bfloat16"))
    assert half.model.blocks.ffn.fc1.kernel.dtype == jnp.bfloat16
    assert half.model.mask_blocks.attn.mat_qkv.kernel.dtype == jnp.bfloat16
    assert half.model.head.kernel.dtype == jnp.float32
    kept = pretrained.load_pretrained(bundle, execution.resolved("cpu", compute_dtype="bfloat16",
                                                                 cast_weights=False)).model
    assert kept.blocks.ffn.fc1.kernel.dtype == kept.mask_blocks.attn.mat_qkv.kernel.dtype \
        == jnp.float32
    plain = pretrained.load_pretrained(bundle, execution.resolved("cpu", cast_weights=False))
    assert plain.model.blocks.ffn.fc1.kernel.dtype == jnp.float32
    assert plain.vae.precision == "default"  # the tokenizer runs with the same config
    exact = pretrained.load_pretrained(bundle, execution.REFERENCE)
    assert exact.vae.precision == "highest"
    for a, b in zip(params(plain.model), params(default)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_demo_bundle_samples_as_it_always_has():
    """The shipped bundle through ``load_pretrained`` with the default execution: its samples
    and an inpainting edit are those it has always given (CPU: float32 model, xla kernels,
    the tokenizer at the platform's default precision)."""
    pre = pretrained.load_pretrained(DEMO)
    assert pre.model.execution.compute_dtype == "float32" and pre.vae.precision == "default"
    assert pre.sampling == sampling.SamplingConfig(cfg=5.0, top_k=0, top_p=0.9,
                                                   mask_schedule="auto", mask_cfg=2.0)
    labels = np.repeat(np.arange(10, dtype=np.int32), 2)
    index = np.tile(np.arange(2, dtype=np.int32), 10)
    images = sampling.generate_batches(pre.model, pre.vae, labels, index, seed=3,
                                       config=pre.sampling, batch_size=8)
    assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
    assert hashlib.sha256(images.tobytes()).hexdigest() == (
        "c7dfda5f30247a4d275c5583e1b189fc4c22b9771adf90e96750b7937055d271")
    source = jnp.broadcast_to(jnp.asarray(images[0], jnp.float32)[None] / 255.0, (3, 16, 16, 3))
    regenerate = sampling.box_mask(16, (0.25, 0.25, 0.75, 0.75), inpaint=True)
    edited = sampling.edit(pre.model, pre.vae, source,
                           jnp.broadcast_to(jnp.asarray(regenerate), (3, 16, 16)),
                           jnp.full((3,), 4, jnp.int32), jnp.arange(3, dtype=jnp.int32), seed=1,
                           config=pre.sampling)
    # The edit is float in [0, 1]: compared at the 8-bit levels an image is saved with, which
    # the decoder's last-bit rounding (it differs with the compiler's optimisation) keeps.
    edited_levels = np.round(np.asarray(edited) * 255).astype(np.uint8)
    assert hashlib.sha256(edited_levels.tobytes()).hexdigest() == (
        "1c8a838dd8b44a6ab592dc155238e7ecb6251926e584b971100a8d55308eab22")


@pytest.mark.slow
def test_export_needs_no_trainer(run, tmp_path):
    """``python -m hmar_jax.export --workdir`` reads the run's config and the EMA weights
    without the trainer (nor the training data): the same bundle as in process."""
    root, bundle = run
    out = tmp_path / "bundle"
    script = (
        "import sys\n"
        "from hmar_jax import export\n"
        f"code = export.main(['--workdir', {str(root / 'workdir')!r}, '--out', {str(out)!r}])\n"
        "assert code == 0, code\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('hmar_jax.train'))\n"
        "assert 'hmar_jax.training.trainer' not in sys.modules, loaded\n"
        "print('training modules:', loaded)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pretrained.read_manifest(out)["source"] == pretrained.read_manifest(bundle)["source"]
    got, want = pretrained.load_pretrained(out), pretrained.load_pretrained(bundle)
    for a, b in zip(params(got.model) + params(got.vae), params(want.model) + params(want.vae)):
        np.testing.assert_array_equal(a, b)


def test_export_errors(run, tmp_path):
    root, bundle = run
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        export.export_workdir(tmp_path, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_workdir(root / "workdir", bundle)
    with pytest.raises(FileNotFoundError, match="run `python -m hmar_jax.export --workdir"):
        pretrained.load_pretrained(root / "workdir")
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        export.parse_args(["--workdir", "a", "--model", "b", "--out", "c"])


def test_pair_export_and_mismatched_tokenizer(run, tmp_path):
    _, bundle = run
    manifest = pretrained.read_manifest(bundle)
    out = export.export_pair(bundle / manifest["model"], bundle / manifest["tokenizer"],
                             tmp_path / "pair", preset="hmar-d16")
    assert pretrained.load_pretrained(out).sampling == sampling.PRESETS["hmar-d16"]
    # A bundle whose tokenizer has another vocabulary is refused with one message.
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    other = VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                              using_sa=False, norm_groups=4, patch_nums=(1, 2, 3, 4, 6, 8)),
                  rngs=nnx.Rngs(0))
    checkpointing.save_tokenizer(broken / "tokenizer", other, overwrite=True)
    with pytest.raises(ValueError, match="tokenizer does not match the model .*vocabulary 32"):
        pretrained.load_pretrained(broken)
    assert sample.main(["--checkpoint", str(broken), "--classes", "1", "--out",
                        str(tmp_path / "s.npz")]) == 2


@pytest.mark.slow
def test_load_onto_a_mesh_gives_the_same_samples(run):
    _, bundle = run
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2)))
    sharded = pretrained.load_pretrained(bundle, mesh=mesh)
    kernel = sharded.model.blocks.ffn.fc1.kernel[...]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # FSDP-sharded
    plain = pretrained.load_pretrained(bundle)
    # Seed 5 and a batch of 8, as test_sample_cli_writes_npz_and_png samples this bundle: the
    # seed is compiled into the sampler, so both tests run one compiled program.
    labels, index = np.array([0, 3, 9]), np.array([0, 1, 2])
    expected = sampling.generate_batches(plain.model, plain.vae, labels, index, seed=5,
                                         config=plain.sampling)
    got = sampling.generate_batches(sharded.model, sharded.vae, labels, index, seed=5,
                                    config=plain.sampling, mesh=jax.sharding.Mesh(
                                        np.asarray(jax.devices()), ("data",)))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_sample_cli_writes_npz_and_png(run, tmp_path):
    _, bundle = run
    out = tmp_path / "samples.npz"
    assert sample.main(["--checkpoint", str(bundle), "--classes", "2,7", "--num", "3",
                        "--out", str(out), "--seed", "5", "--batch-size", "4",
                        "--unstack-blocks"]) == 0
    with np.load(out) as z:
        images, labels, index = z["images"], z["labels"], z["sample_index"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [2, 2, 2, 7, 7, 7])
    np.testing.assert_array_equal(index, [0, 1, 2, 0, 1, 2])
    loaded = pretrained.load_pretrained(bundle)
    direct = sampling.generate_batches(loaded.model, loaded.vae, labels, index, seed=5,
                                       config=loaded.sampling)
    np.testing.assert_array_equal(images, direct)  # per-block weights (unstacked): same samples
    png = tmp_path / "grid.png"
    assert sample.main(["--checkpoint", str(bundle), "--classes", "all", "--num", "2",
                        "--out", str(png)]) == 0
    width, height = Image.open(png).size
    assert (height, width) == ((10 * 17 + 1) * 8, (2 * 17 + 1) * 8)  # 16 px cells + padding, x8
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("argv, message", [
    (["--classes", "10"], "Class id 10 is out of range: this model has classes 0..9"),
    (["--classes", "3,x"], "--classes entry 'x' is not an integer"),
    (["--classes", "1", "--preset", "nope"], "Unknown --preset 'nope'"),
])
def test_sample_cli_errors(run, tmp_path, capsys, argv, message):
    _, bundle = run
    code = sample.main(["--checkpoint", str(bundle), "--out", str(tmp_path / "x.npz"), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.slow
def test_edit_cli_inpaints_and_rejects_bad_input(run, tmp_path, capsys):
    _, bundle = run
    source = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(source).save(tmp_path / "src.png")
    out = tmp_path / "edits.npz"
    base = ["--checkpoint", str(bundle), "--image", str(tmp_path / "src.png")]
    assert edit.main([*base, "--box", "0.25,0.25,0.75,0.75", "--class", "4", "--num", "2",
                      "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (2, 16, 16, 3)
        assert z["regenerate"][8, 8] and not z["regenerate"][0, 0]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
    cases = [
        (["--image", str(tmp_path / "big.png"), "--box", "0,0,0.5,0.5"], "pass --resize"),
        (["--mask", str(tmp_path / "small_mask.png")], "--mask is 8x8 but the image is 16x16"),
        (["--box", "0.5,0.5,0.2,0.9"], "must be (y0, x0, y1, x1)"),
        (["--box", "0,0,1,1", "--class", "12"], "Class id 12 is out of range"),
    ]
    for extra, message in cases:
        argv = [*base, *extra, "--out", str(tmp_path / "bad.png")]
        if "--image" in extra:
            argv = ["--checkpoint", str(bundle), *extra, "--out", str(tmp_path / "bad.png")]
        assert edit.main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "bad.png").exists()
    assert json.loads((bundle / pretrained.MANIFEST).read_text())["format"] == pretrained.FORMAT
    assert pathlib.Path(bundle / "model" / "hmar_config.json").is_file()
