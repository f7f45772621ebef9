"""HMAR on the embedded 8x8 digits (CPU-sized): stage 1 and stage 2 on a trained tokenizer.

What `make demo` runs (there stage 1 draws no samples: stage 2's judge the run). The
tokenizer first (configs/tokenizer_digits.py), then the digits encoded once into a token
cache, which both stages read instead of images:
  D=workdirs/demo
  python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py --workdir $D/tokenizer
  python -m hmar_jax.pretokenize --config configs/demo.py \\
      --config.tokenizer.export=$D/tokenizer/tokenizer --out $D/tokens
Stage 1 (next-scale prediction, Markov mask):
  python -m hmar_jax.train --config configs/demo.py --workdir $D/stage1 \\
      --config.tokenizer.export=$D/tokenizer/tokenizer --config.data.pretokenized=$D/tokens
Stage 2 (masked refinement from the stage-1 export; 1,000 samples scored by the digits
classifier, see hmar_jax.evaluate.digits):
  python -m hmar_jax.train --config configs/demo.py:stage=2 --workdir $D/stage2 \\
      --config.tokenizer.export=$D/tokenizer/tokenizer --config.data.pretokenized=$D/tokens \\
      --config.stage2.parent=$D/stage1/export
Without --config.data.pretokenized each step encodes its images: the same tokens, since the
digits have no augmentation to lose. Quick smoke run:
  python -m hmar_jax.train --config configs/demo.py:runlocal --workdir /tmp/demo \\
      --config.tokenizer.export=$D/tokenizer/tokenizer
"""

import ml_collections

from hmar_jax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_files.parse_arg(arg, stage=1, runlocal=False)
    runlocal = args["runlocal"]
    if args["stage"] not in (1, 2):
        raise ValueError(f"Unknown stage {args['stage']}; use stage=1 or stage=2.")

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stage = args["stage"]
    config.mesh = (("data", -1), ("fsdp", 1))

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"         # digits | image_folder | tfds
    config.data.split = "all"            # digits: train/eval/all; tfds: a TFDS split
    config.data.image_size = 16
    config.data.root = ""                # image_folder: root/<class>/<images>
    config.data.tfds_name = ""           # tfds: e.g. imagenet2012 (array_record files)
    config.data.data_dir = ""            # tfds: data_dir ("" = TFDS default)
    config.data.num_workers = 0          # grain worker processes for decoding
    config.data.skip_corrupt = True      # skip unreadable images with a warning
    config.data.pretokenized = ""        # token cache dir (python -m hmar_jax.pretokenize) or ""

    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.export = ""  # required: a tokenizer export (python -m hmar_jax.train_tokenizer)

    config.model = ml_collections.ConfigDict()
    config.model.preset = "tiny"
    config.model.overrides = ml_collections.ConfigDict(dict(
        depth=4, width=128, num_heads=2, num_classes=10, num_mask_layers=2,
        drop_path_rate=0.0, init_adaln_gamma=1e-3))

    config.loss = ml_collections.ConfigDict()
    config.loss.weighting = "lognorm"      # stage 1; stage 2 uses the masked loss
    config.loss.label_dropout = 0.1

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.peak_lr = 1e-3
    config.optimizer.warmup_steps = 40 if config.stage == 1 else 10
    config.optimizer.end_fraction = 0.1
    config.optimizer.weight_decay = 0.05
    config.optimizer.weight_decay_end = 0.05  # cosine from weight_decay to this
    config.optimizer.grad_clip = 2.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95

    # How it runs (kernels, dtypes, remat, microbatches, ...): the platform's defaults but for
    # unrolled blocks (four of them: faster steps than scanned, for a short compile; the smoke
    # run, whose few steps weigh less than its compile, keeps the defaults); the tokenizer
    # encodes at the platform's fast float32 (TF32 on GPUs, like upstream).
    unrolled = {} if runlocal else {"scan_blocks": False}
    config.execution = config_files.execution(**unrolled)

    config.stage2 = ml_collections.ConfigDict()
    config.stage2.parent = ""              # stage-1 export directory (required for stage 2)

    config.batch_size = 48
    config.num_train_steps = 300 if config.stage == 1 else 60
    # An EMA window (1 / (1 - decay) steps) short against the run: the exported weights keep
    # about 1% (stage 1) and 5% (stage 2) of the weights the run started from.
    config.ema_decay = 0.985 if config.stage == 1 else 0.95
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.max_checkpoints_to_keep = 2
    config.log_batch_fingerprints = False  # workdir/batch_fingerprints.txt: data seen per step
    config.sampling = ml_collections.ConfigDict()
    config.sampling.samples_per_class = 100  # > 0: samples.npz, samples.png (first 10 per class)
    # Moderate guidance and no top-k/top-p cut: stronger guidance or a nucleus cut adds no
    # recognisability here and costs variety (more near-duplicates, a larger Frechet distance).
    config.sampling.cfg = 2.0
    config.sampling.mask_cfg = ml_collections.config_dict.placeholder(float)  # None: unguided
    config.sampling.top_k = 0
    config.sampling.top_p = 1.0
    config.profile_first_step = 0          # > 0: write a 5-step profile trace to workdir/tb

    if runlocal:
        config.num_train_steps = 6
        config.optimizer.warmup_steps = 2
        config.log_every_steps = 2
        config.checkpoint_every_steps = 2
        config.batch_size = 16
        config.sampling.samples_per_class = 2
    return config
