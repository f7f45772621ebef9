"""Token caches: written indices equal the tokenizer's, training from a cache equals
training from images, and a cache from another tokenizer or a broken one is refused."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.training import data
from hmar_jax.training import token_cache
from hmar_jax.training import trainer
from hmar_jax.tokenizer.model import VQVAE
from tiny_runs import demo_config


@nnx.jit  # one compile: run eagerly, every op of the encoder compiles alone
def encode_to_indices(vae, images):
    return vae.encode_to_indices(images)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory, tokenizer_export):
    """The whole digits set ('all') encoded by the test tokenizer: (config, cache dir)."""
    config = demo_config(**{"tokenizer.export": tokenizer_export})
    root = tmp_path_factory.mktemp("cache")
    token_cache.pretokenize(config, root / "tokens")
    return config, root / "tokens"


@pytest.mark.slow
def test_cache_holds_the_tokenizers_indices(digits_cache, tokenizer_export):
    config, path = digits_cache
    vae = checkpointing.load_tokenizer(tokenizer_export, trainer.resolve_execution(config))
    tokens, labels, manifest = token_cache.open_token_cache(path, vae)
    images, want_labels = data.digits_split(config.data.image_size, "all")
    assert manifest["num_examples"] == len(want_labels) == tokens.shape[0]
    assert tokens.dtype == np.uint16 and tokens.shape[1] == vae.config.layout.seq_len
    np.testing.assert_array_equal(labels, want_labels)
    some = slice(100, 140)
    batch = data.to_model_range({"image": images[some], "label": want_labels[some]})["image"]
    indices = encode_to_indices(vae, jnp.asarray(batch))
    np.testing.assert_array_equal(np.asarray(tokens[some]),
                                  np.asarray(token_cache.flatten_indices(indices)))
    # ScaleLayout.split_tokens inverts flatten_indices, on jax arrays too
    for a, b in zip(vae.config.layout.split_tokens(jnp.asarray(tokens[some], jnp.int32)),
                    indices):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_images(tmp_path, digits_cache):
    """Both stages (stage 2 from the stage-1 export, as the demo runs them)."""
    config, path = digits_cache
    # The stages of test_trainer's stage-2 run: from images, the same compiled steps.
    stage1 = {"num_train_steps": 2, "log_batch_fingerprints": False}
    stage2 = {"num_train_steps": 3, "log_batch_fingerprints": False, "ema_decay": 0.0,
              "stage": 2, "stage2.parent": str(tmp_path / "images1" / "export")}
    for stage, changes in ((1, stage1), (2, stage2)):
        from_images = demo_config(**{"tokenizer.export": config.tokenizer.export, **changes})
        from_cache = demo_config(**{"tokenizer.export": config.tokenizer.export,
                                    "data.pretokenized": str(path), **changes})
        names = [f"images{stage}", f"cache{stage}"]
        a = trainer.Trainer(from_images, str(tmp_path / names[0])).run()
        b = trainer.Trainer(from_cache, str(tmp_path / names[1])).run()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        params = [nnx.to_pure_dict(nnx.state(checkpointing.load_hmar(tmp_path / n / "export"),
                                             nnx.Param)) for n in names]
        for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bad_caches_are_refused(tmp_path, digits_cache, tokenizer_export):
    config, path = digits_cache
    other = VQVAE(checkpointing.load_tokenizer(tokenizer_export).config, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="different tokenizer"):
        token_cache.open_token_cache(path, other)
    with pytest.raises(FileNotFoundError, match="python -m hmar_jax.pretokenize"):
        token_cache.open_token_cache(tmp_path / "missing", other)
    with pytest.raises(FileExistsError, match="already exists"):
        token_cache.pretokenize(config, path)
    with pytest.raises(ValueError, match="leave it empty"):
        cached = demo_config(**{"tokenizer.export": tokenizer_export,
                                "data.pretokenized": str(path)})
        token_cache.pretokenize(cached, tmp_path / "again")
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((path / token_cache.MANIFEST).read_text())
    (broken / token_cache.MANIFEST).write_text(json.dumps(manifest | {"num_examples": 5}))
    np.save(broken / token_cache.TOKENS, np.zeros((4, manifest["seq_len"]), np.uint16))
    np.save(broken / token_cache.LABELS, np.zeros((4,), np.int32))
    vae = checkpointing.load_tokenizer(tokenizer_export)
    with pytest.raises(ValueError, match="malformed"):
        token_cache.open_token_cache(broken, vae)
    # A run pointed at a cache of another tokenizer fails at start, naming the fix.
    run_dir = pathlib.Path(tmp_path / "run")
    run_dir.mkdir()
    checkpointing.save_tokenizer(run_dir / "tokenizer", other)
    wrong = demo_config(**{"data.pretokenized": str(path),
                           "tokenizer.export": str(run_dir / "tokenizer")})
    with pytest.raises(ValueError, match="different tokenizer"):
        trainer.Trainer(wrong, str(run_dir)).make_iterator()


@pytest.mark.slow
def test_image_folder_is_encoded_once_centre_cropped(tmp_path, tokenizer_export):
    from test_data import _image_folder

    root = _image_folder(tmp_path / "images")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")  # skipped with a warning
    config = demo_config(**{"tokenizer.export": tokenizer_export, "data.name": "image_folder",
                            "data.root": str(root), "batch_size": 4})
    manifest = token_cache.pretokenize(config, tmp_path / "tokens")
    vae = checkpointing.load_tokenizer(tokenizer_export, trainer.resolve_execution(config))
    tokens, labels, _ = token_cache.open_token_cache(tmp_path / "tokens", vae)
    assert manifest["num_examples"] == 6 and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    source = data.ImageFolderSource.scan(str(root))
    crops = [data.DecodeAndCrop(16, train=False).random_map(source[i], np.random.default_rng(0))
             for i in range(len(source))]
    images = np.stack([c["image"] for c in crops if c is not None])
    want = token_cache.flatten_indices(encode_to_indices(
        vae, jnp.asarray(data.to_model_range({"image": images, "label": labels})["image"])))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
