"""HMAR on ImageNet: the upstream recipes for d16/d20/d24/d30, stage 1 and stage 2, 256/512 px.

Arguments (``--config configs/hmar_imagenet.py:variant=d16,res=256,stage=1``):
  variant  d16 | d20 | d24 | d30
  res      256 | 512 (512 px has no upstream config or checkpoint; same recipe, L = 2240)
  stage    1 (next-scale, lognorm loss) | 2 (masked refinement of the last 8 blocks)
  runlocal tiny run for a smoke test of the plumbing

Data: TFDS ``imagenet2012`` prepared once as array_record (needs the manual download and,
for the preparation only, TensorFlow); reading needs no TensorFlow. Tokenizer: VAR's
released VQ-VAE converted with
  python -m hmar_jax.convert vqvae --src vae_ch160v4096z32.pth --out checkpoints/vae
Launch, one GPU node (8 GPUs) or a local machine:
  launch/local.sh configs/hmar_imagenet.py:variant=d16 /data/runs/hmar-d16 \\
      --config.tokenizer.export=checkpoints/vae --config.data.data_dir=/data/tfds
(d30 on one 8-GPU node: its 1024-image batch is 128 per GPU; add --config.execution.microbatches=4.)
SLURM (one process per GPU) or a TPU pod slice:
  sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh \\
      configs/hmar_imagenet.py:variant=d30 /shared/runs/hmar-d30 --config.tokenizer.export=...
  launch/tpu_pod.sh NAME ZONE configs/hmar_imagenet.py:variant=d24 /mnt/runs/hmar-d24 ...
Stage 2 from a stage-1 export (or a converted official HMAR/NSP file):
  launch/local.sh configs/hmar_imagenet.py:variant=d16,stage=2 /data/runs/hmar-d16-mask \\
      --config.stage2.parent=/data/runs/hmar-d16/export --config.tokenizer.export=...

Expected results: not yet measured with this code. Upstream reference points are VAR's
FIDs (d16 3.55, d20 2.95, d24 2.33, d30 1.97); HMAR reports matching or better quality.
Wall-clock time: 200-350 epochs of ImageNet; benchmarks/RESULTS.md has measured step times.
"""

import math

import ml_collections

from hmar_jax import config_files

IMAGENET_TRAIN_IMAGES = 1_281_167

# Upstream per-depth recipes (HMAR config/experiment/*.yaml).
RECIPES = {
    "d16": dict(batch=768, epochs=200, tblr=1e-4, wd_end=0.05, alng=1e-3, wpe=0.1, warmup_epochs=4),
    "d20": dict(batch=768, epochs=250, tblr=1e-4, wd_end=0.05, alng=1e-3, wpe=0.1, warmup_epochs=5),
    "d24": dict(batch=768, epochs=350, tblr=8e-5, wd_end=0.05, alng=1e-4, wpe=0.01, warmup_epochs=7),
    "d30": dict(batch=1024, epochs=350, tblr=8e-5, wd_end=0.08, alng=1e-5, wpe=0.01, warmup_epochs=7),
}
STAGE2_EPOCHS, STAGE2_WARMUP_EPOCHS, MASK_LAYERS = 100, 2, 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_files.parse_arg(arg, variant="d16", res=256, stage=1, runlocal=False)
    if args["variant"] not in RECIPES:
        raise ValueError(f"Unknown variant {args['variant']!r}; use one of {sorted(RECIPES)}.")
    if args["res"] not in (256, 512) or args["stage"] not in (1, 2):
        raise ValueError("res must be 256 or 512 and stage 1 or 2.")
    recipe = RECIPES[args["variant"]]
    stage = args["stage"]
    epochs = recipe["epochs"] if stage == 1 else STAGE2_EPOCHS
    warmup_epochs = recipe["warmup_epochs"] if stage == 1 else STAGE2_WARMUP_EPOCHS
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / recipe["batch"])

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stage = stage
    # d16/d20: data parallel; d24/d30: parameters and optimizer state FSDP-sharded over all
    # devices. With unrolled blocks (the GPU default) XLA keeps every block's gathered weights
    # live when they fit; --config.execution.scan_blocks=True gathers one block at a time.
    config.mesh = (("data", -1), ("fsdp", 1)) if args["variant"] in ("d16", "d20") else (
        ("data", 1), ("fsdp", -1))

    config.data = ml_collections.ConfigDict()
    config.data.name = "tfds"
    config.data.split = "train"
    config.data.image_size = args["res"]
    config.data.root = ""
    config.data.tfds_name = "imagenet2012"
    config.data.data_dir = ""
    config.data.num_workers = 16
    config.data.skip_corrupt = True
    config.data.pretokenized = ""        # token cache dir (python -m hmar_jax.pretokenize) or ""

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.export = ""  # required: a converted VAR VQ-VAE export

    config.model = ml_collections.ConfigDict()
    config.model.preset = args["variant"]
    config.model.overrides = ml_collections.ConfigDict(dict(
        num_classes=1000, num_mask_layers=MASK_LAYERS, init_adaln_gamma=recipe["alng"]))

    # How it runs. 256 px: the platform's defaults, on GPUs the fastest setting measured
    # that fits (benchmarks/RESULTS.md). 512 px (L = 2240): four times the activations per
    # image, so every block reruns in the backward and the blocks are scanned, which also
    # lets FSDP gather one block's weights at a time.
    config.execution = config_files.execution(
        **({} if args["res"] == 256 else dict(remat="block", scan_blocks=True)))

    config.loss = ml_collections.ConfigDict()
    config.loss.weighting = "lognorm"
    config.loss.label_dropout = 0.1

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.peak_lr = recipe["tblr"] * recipe["batch"] / 256
    config.optimizer.warmup_steps = warmup_epochs * steps_per_epoch
    config.optimizer.end_fraction = recipe["wpe"]
    config.optimizer.weight_decay = 0.05
    config.optimizer.weight_decay_end = recipe["wd_end"]
    config.optimizer.grad_clip = 2.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95

    config.stage2 = ml_collections.ConfigDict()
    config.stage2.parent = ""  # stage 2: the stage-1 export (ours or converted)

    config.batch_size = recipe["batch"]  # global; per GPU on 8 GPUs: 96 (d16-d24), 128 (d30)
    config.num_train_steps = epochs * steps_per_epoch
    config.ema_decay = 0.9999
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.max_checkpoints_to_keep = 3
    config.log_batch_fingerprints = False
    config.sampling = ml_collections.ConfigDict()
    config.sampling.samples_per_class = 0   # > 0: samples.png (a row per class) at the end
    config.sampling.cfg = 1.5
    config.sampling.mask_cfg = ml_collections.config_dict.placeholder(float)  # None: upstream
    config.sampling.top_k = 0
    config.sampling.top_p = 0.9
    config.profile_first_step = 0          # > 0: write a 5-step profile trace to workdir/tb

    if args["runlocal"]:
        config.batch_size = 8
        config.num_train_steps = 10
        config.optimizer.warmup_steps = 2
        config.log_every_steps = 2
        config.checkpoint_every_steps = 5
        config.data.num_workers = 0
        config.mesh = (("data", -1), ("fsdp", 1))
        config.model.preset = "tiny"
        config.model.overrides = ml_collections.ConfigDict(dict(
            depth=2, width=64, num_heads=1, num_classes=1000, num_mask_layers=1))
    return config
