"""A stage-1 training step of a d16 model with ``pallas`` vs ``reference`` attention (GPU).

Same weights, inputs and labels; compares the loss and every parameter gradient
(relative L2 error) in bfloat16 compute, and times the steps. The Pallas step runs once
per ``--prologue-backends`` entry (``model.attention_prologue_backend``: who
differentiates the q/k/v prologue), each compared with the reference.

  python benchmarks/check_model_attention.py --batch 8 --out check.json
  python benchmarks/check_model_attention.py --prologue-backends xla,pallas
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.attention import time_ms  # noqa: E402
from hmar_jax.training import losses  # noqa: E402
from hmar_jax.transformer import HMARTransformer, preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", default="d16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prologue-backends", default="auto",
                        help="comma-separated attention_prologue_backend values for the "
                             "Pallas step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prologue_backends = args.prologue_backends.split(",")

    # Larger gamma and head init than upstream's so that attention visibly shapes the loss
    # and every gradient (with the upstream init the head starts near zero).
    cfg = preset(args.depth, dtype=args.dtype, attention_backend="reference", remat="block",
                 init_adaln_gamma=0.3, init_head=1.0)
    layout = cfg.layout
    model = HMARTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (args.batch, layout.seq_len - 1, cfg.latent_channels))
    labels = jax.random.randint(keys[1], (args.batch,), 0, cfg.num_classes)
    targets = jax.random.randint(keys[2], (args.batch, layout.seq_len), 0, cfg.vocab_size)
    weights = jnp.asarray(layout.token_loss_weights("lognorm"))

    def make_step(backend: str, prologue_backend: str = "auto"):
        variant_cfg = cfg.replace(attention_backend=backend,
                                  attention_prologue_backend=prologue_backend)
        variant = nnx.graphdef(HMARTransformer(variant_cfg, rngs=nnx.Rngs(0)))

        @jax.jit
        def step(state):
            def loss_fn(state):
                logits = nnx.merge(variant, state)(x, labels)
                return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)[0]
            return jax.value_and_grad(loss_fn)(state)
        return step

    del graphdef
    step = make_step("reference")
    loss_ref, grads_ref = step(state)
    results = {"device": jax.devices()[0].device_kind, "depth": args.depth,
               "batch": args.batch, "dtype": args.dtype,
               "loss_reference": float(loss_ref),
               "reference_step_ms": time_ms(step, state, repeats=5, inner=3)}
    for prologue_backend in prologue_backends:
        step = make_step("pallas", prologue_backend)
        loss_pal, grads_pal = step(state)
        errors = jax.tree.map(
            lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                               / jnp.maximum(jnp.linalg.norm(a.astype(jnp.float32)), 1e-30)),
            grads_ref, grads_pal)
        flat = jax.tree_util.tree_flatten_with_path(errors)[0]
        worst = max(flat, key=lambda kv: kv[1])
        # The first variant keeps the original keys (earlier JSONs compare with them).
        suffix = "" if prologue_backend == prologue_backends[0] else f"_{prologue_backend}"
        results.update({
            f"pallas{suffix}_prologue_backend": prologue_backend,
            f"pallas{suffix}_step_ms": time_ms(step, state, repeats=5, inner=3),
            f"loss_pallas{suffix}": float(loss_pal),
            f"loss_rel_diff{suffix}": abs(float(loss_pal) - float(loss_ref)) / abs(float(loss_ref)),
            f"grad_rel_err_median{suffix}": float(np.median([v for _, v in flat])),
            f"grad_rel_err_max{suffix}": worst[1],
            f"grad_rel_err_max_param{suffix}": jax.tree_util.keystr(worst[0])})
    print(json.dumps(results, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
