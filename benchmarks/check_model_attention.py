"""A stage-1 training step with the Pallas attention kernel vs the XLA reference.

Same weights, inputs and labels; compares the loss and every parameter gradient
(relative L2 error) and times the steps. Both steps run the platform's default execution
with ``remat=block``; the reference with ``attention=xla``, the kernel step with
``attention=pallas`` (on GPUs the compiled kernels, whose backward also differentiates the
q/k/v prologue in one Pallas pass; on CPU interpret mode). Each ``--execution`` variant
replaces the kernel step's settings and is compared with the reference; the first keeps
the JSON keys ``pallas_step_ms``, ``loss_pallas``, ..., the others add ``_<variant>``.

  python benchmarks/check_model_attention.py --batch 8 --out check.json
  python benchmarks/check_model_attention.py --execution attention=pallas \\
      --execution attention=pallas,compute_dtype=float32
  python benchmarks/check_model_attention.py --depth tiny --batch 2     # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.attention import time_ms  # noqa: E402
from benchmarks.train_step import add_execution_flag, execution_label  # noqa: E402
from hmar_jax.execution import ExecutionConfig  # noqa: E402
from hmar_jax.training import losses  # noqa: E402
from hmar_jax.transformer import HMARTransformer, preset  # noqa: E402

BASE = {"remat": "block"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", default="d16")
    parser.add_argument("--batch", type=int, default=8)
    add_execution_flag(parser, "remat=block; default: attention=pallas")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = args.execution or [{"attention": "pallas"}]

    # Larger gamma and head init than upstream's so that attention visibly shapes the loss
    # and every gradient (with the upstream init the head starts near zero).
    cfg = preset(args.depth, init_adaln_gamma=0.3, init_head=1.0)
    reference = ExecutionConfig.from_mapping(BASE | {"attention": "xla"}).resolve()
    layout = cfg.layout
    model = HMARTransformer(cfg, reference, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (args.batch, layout.seq_len - 1, cfg.latent_channels))
    labels = jax.random.randint(keys[1], (args.batch,), 0, cfg.num_classes)
    targets = jax.random.randint(keys[2], (args.batch, layout.seq_len), 0, cfg.vocab_size)
    weights = jnp.asarray(layout.token_loss_weights("lognorm"))

    def make_step(execution: ExecutionConfig):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: HMARTransformer(cfg, execution,
                                                                       rngs=nnx.Rngs(0))))

        @jax.jit
        def step(state):
            def loss_fn(state):
                logits = nnx.merge(graphdef, state)(x, labels)
                return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)[0]
            return jax.value_and_grad(loss_fn)(state)
        return step

    del model
    step = make_step(reference)
    loss_ref, grads_ref = step(state)
    results = {"device": jax.devices()[0].device_kind, "depth": args.depth,
               "batch": args.batch, "reference_execution": dataclasses.asdict(reference),
               "loss_reference": float(loss_ref),
               "reference_step_ms": time_ms(step, state, repeats=5, inner=3)}
    for index, settings in enumerate(variants):
        execution = ExecutionConfig.from_mapping(BASE | settings).resolve()
        step = make_step(execution)
        loss_pal, grads_pal = step(state)
        errors = jax.tree.map(
            lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                               / jnp.maximum(jnp.linalg.norm(a.astype(jnp.float32)), 1e-30)),
            grads_ref, grads_pal)
        flat = jax.tree_util.tree_flatten_with_path(errors)[0]
        worst = max(flat, key=lambda kv: kv[1])
        # The first variant keeps the plain keys (earlier JSONs compare with them).
        suffix = "" if index == 0 else f"_{execution_label(settings)}"
        results.update({
            f"pallas{suffix}_execution": dataclasses.asdict(execution),
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
