"""Pretokenized training data: token-index caches that replace the tokenizer in the step.

By default the frozen tokenizer encodes every batch inside the jitted training step, a
sizeable share of the step at 256 px. With
``config.data.pretokenized=DIR`` the step reads the indices from a cache written once by
``python -m hmar_jax.pretokenize`` and only builds the teacher-forcing inputs from them
(codebook lookups and resampling, no encoder).

A cache directory holds (written atomically, so a half-written cache never exists)::

  tokens.npy      uint16 [N, L]   all scales' indices, each scale row-major, coarse to fine
  labels.npy      int32  [N]
  manifest.json   format, N, L, patch_nums, vocab_size, the tokenizer fingerprint, the
                  data it came from

The images are centre-cropped (the evaluation crop): a cache trades the random-crop
augmentation for skipping the encoder. Training refuses a cache made by another tokenizer
(``tokenizer_fingerprint``: a hash of the tokenizer's architecture and weights).

Dimension letters: N examples, B batch, L tokens, p side of one scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Iterable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.atomic_io import atomic_directory
from hmar_jax.tokenizer.model import VQVAE

FORMAT = "hmar_jax.training.token_cache/1"
TOKENS, LABELS, MANIFEST = "tokens.npy", "labels.npy", "manifest.json"


def tokenizer_fingerprint(vae: VQVAE) -> str:
    """sha256 of the tokenizer's architecture (its config) and of every parameter and
    buffer, in path order."""
    digest = hashlib.sha256()
    config = dataclasses.asdict(vae.config)
    digest.update(json.dumps(config, sort_keys=True, default=list).encode())
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(vae)))[0]
    for path, value in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(jax.device_get(value))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def flatten_indices(indices: list[jax.Array]) -> jax.Array:
    """S index maps ``[B, p_k, p_k]`` -> ``[B, L]`` (the training targets' order)."""
    return jnp.concatenate([i.reshape(i.shape[0], -1) for i in indices], axis=1)


def write_token_cache(vae: VQVAE, batches: Iterable[dict], out_dir: str | pathlib.Path, *,
                      source: dict, overwrite: bool = False) -> dict:
    """Encodes every batch (``{"image": f32 [B, H, W, 3] in [-1, 1], "label": [B]}``) and
    writes the cache to ``out_dir``; returns the manifest."""
    if vae.config.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab_size {vae.config.vocab_size} does not fit the uint16 cache.")
    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state, images):
        return flatten_indices(nnx.merge(graphdef, state).encode_to_indices(images))

    token_chunks, label_chunks = [], []
    for batch in batches:
        token_chunks.append(np.asarray(encode(state, jnp.asarray(batch["image"]))).astype(np.uint16))
        label_chunks.append(np.asarray(batch["label"], np.int32))
    if not token_chunks:
        raise ValueError("No images to tokenize: the dataset is empty.")
    tokens, labels = np.concatenate(token_chunks), np.concatenate(label_chunks)
    manifest = {"format": FORMAT, "num_examples": int(len(labels)), "seq_len": int(tokens.shape[1]),
                "patch_nums": list(vae.config.patch_nums), "vocab_size": vae.config.vocab_size,
                "image_size": vae.config.image_size, "crop": "center",
                "tokenizer_fingerprint": tokenizer_fingerprint(vae),
                "tokenizer_precision": vae.precision, "source": source}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        np.save(tmp / TOKENS, tokens)
        np.save(tmp / LABELS, labels)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def open_token_cache(path: str | pathlib.Path, vae: VQVAE) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(tokens uint16 [N, L] memory-mapped, labels int32 [N], manifest)``, checked against
    the tokenizer that will build the teacher-forcing inputs."""
    path = pathlib.Path(path)
    fix = f"write one with `python -m hmar_jax.pretokenize --config <config> --out {path}`"
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"config.data.pretokenized={path} is not a token cache (no "
                                f"{MANIFEST}); {fix}.")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has token-cache format {manifest.get('format')!r}, this code "
                         f"reads {FORMAT!r}; {fix}.")
    if manifest["patch_nums"] != list(vae.config.patch_nums) or \
            manifest["vocab_size"] != vae.config.vocab_size or \
            manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(vae):
        raise ValueError(f"The token cache {path} was written by a different tokenizer than the "
                         f"run's (patch_nums {manifest['patch_nums']}, vocab "
                         f"{manifest['vocab_size']}, fingerprint "
                         f"{manifest['tokenizer_fingerprint'][:12]}...); {fix}.")
    tokens = np.load(path / TOKENS, mmap_mode="r")
    labels = np.load(path / LABELS)
    n = manifest["num_examples"]
    if tokens.shape != (n, manifest["seq_len"]) or labels.shape != (n,) or n == 0:
        raise ValueError(f"The token cache {path} is malformed (tokens {tokens.shape}, labels "
                         f"{labels.shape}, manifest says {n} examples); {fix}.")
    return tokens, labels, manifest


class TokenSource:
    """A grain random-access source over a cache: ``{"tokens": int32 [L], "label": int32}``."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"tokens": np.asarray(self.tokens[index], np.int32),
                "label": np.int32(self.labels[index])}


def token_iterator(tokens: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Endless, checkpointable batches ``{"tokens": int32 [b, L], "label": [b]}``: this
    process's rows of each global batch of ``batch_size``, reshuffled every epoch (the same
    global order and process split as the image pipelines, ``data.ProcessRows``)."""
    from hmar_jax.training import data  # local: the image pipelines are not needed otherwise

    dataset = grain.MapDataset.source(TokenSource(tokens, labels))
    if len(dataset) < batch_size:
        raise ValueError(f"Batch size {batch_size} exceeds the {len(dataset)} cached examples.")
    dataset = dataset.shuffle(seed=seed).repeat()
    dataset = data.ProcessRows(dataset, batch_size, process_index, process_count)
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
    return iter(dataset.to_iter_dataset())


def pretokenize(config, out: str | pathlib.Path, *, overwrite: bool = False) -> dict:
    """Writes the token cache of a training config's dataset (every example once,
    centre-cropped) to ``out``, encoded by its tokenizer (``config.tokenizer.export``) as the
    run's ``config.execution`` resolves it; returns the manifest. One process encodes
    everything on its default device."""
    from hmar_jax.execution import ExecutionConfig
    from hmar_jax.training import data, tokenizer_trainer  # local: the image pipelines

    if config.data.pretokenized:
        raise ValueError("config.data.pretokenized is set: pretokenize reads the images, leave it "
                         "empty here.")
    execution = ExecutionConfig.from_mapping(config.execution).resolve()
    vae = tokenizer_trainer.load_trained_tokenizer(config, execution)
    dataset = data.open_dataset(config.data)
    d = config.data
    source = {"name": d.name, "split": d.split, "image_size": d.image_size,
              "tfds_name": d.tfds_name, "root": pathlib.Path(d.root).name if d.root else ""}
    return write_token_cache(vae, dataset.batches(config.batch_size, train=False), out,
                             source=source, overwrite=overwrite)
