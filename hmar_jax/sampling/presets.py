"""Named sampling settings per released checkpoint (upstream config/sample and
config/evaluate), as data."""

from __future__ import annotations

from hmar_jax.sampling.sampler import SamplingConfig

# Named presets per released checkpoint (upstream config/sample and config/evaluate).
PRESETS: dict[str, SamplingConfig] = {
    "hmar-d16": SamplingConfig(cfg=1.7, top_k=1000, top_p=0.99),
    "hmar-d20": SamplingConfig(cfg=1.9, top_k=950, top_p=0.99),
    "hmar-d24": SamplingConfig(cfg=2.1, top_k=900, top_p=0.99),
    "hmar-d30": SamplingConfig(cfg=1.7, top_k=1000, top_p=0.99),
    "hmar-d30-fid": SamplingConfig(cfg=1.6, top_k=650, top_p=0.99),
    "var-readme": SamplingConfig(cfg=1.5, top_k=900, top_p=0.96, mask_schedule=None),
}


def check_preset_name(name: str) -> str:
    """Raises ValueError unless ``name`` is a preset of :data:`PRESETS` or ``"default"``;
    needs no checkpoint, so command lines check it before loading one."""
    if name != "default" and name not in PRESETS:
        raise ValueError(f"Unknown --preset {name!r}; choose one of {', '.join(sorted(PRESETS))} "
                         "or 'default' (the checkpoint's own sampling config).")
    return name


def resolve_preset(name: str, pretrained=None) -> SamplingConfig:
    """A named preset, or ``"default"``: the sampling config stored with a pretrained
    checkpoint (``hmar_jax.pretrained.Pretrained``)."""
    check_preset_name(name)
    if name == "default":
        if pretrained is None or pretrained.sampling is None:
            raise ValueError("Preset 'default' needs a checkpoint that stores a sampling config; "
                             f"choose one of {sorted(PRESETS)}.")
        return pretrained.sampling
    return PRESETS[name]
