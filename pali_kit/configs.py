"""Model configurations and the registry of official PaliGemma checkpoints.

Field names follow big_vision (``width``, ``depth``, ``mlp_dim``, ``num_heads``,
``num_kv_heads``, ``head_dim``, ``final_logits_softcap``, ...), so a config reads
like the reference config it came from.

    >>> import pali_kit as pk
    >>> cfg = pk.CHECKPOINTS["paligemma2-3b-pt-224"].config
    >>> cfg.llm.width, cfg.vision.num_tokens
    (2304, 256)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

VOCAB_SIZE = 257_152  # 256,000 Gemma pieces + 1024 <loc> + 128 <seg>


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP image encoder (big_vision ``vit.py``); So400m/14 by default."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224  # square input resolution in pixels
    compute_dtype: str | None = None  # see PaliGemmaConfig.replace and pali_kit/model/common.py

    def __post_init__(self):
        _check_compute_dtype(self)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: (image_size / patch_size) ** 2."""
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class GemmaConfig:
    """Gemma 1 or Gemma 2 decoder (big_vision ``gemma.py`` ``get_config``)."""

    variant: str = "gemma_2b"
    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16_384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = VOCAB_SIZE
    norm_eps: float = 1e-6
    post_norms: bool = False  # Gemma 2: RMSNorm after attention and after the MLP
    # Gemma 2's query scale: "rsqrt_head_dim" (H ** -0.5) or
    # "rsqrt_emb_per_head" ((width / num_heads) ** -0.5, the 27B LLM).
    query_pre_attn_norm: str = "rsqrt_head_dim"
    attn_logits_softcap: float = 0.0  # 0 disables
    final_logits_softcap: float = 0.0  # 0 disables
    rope_base: float = 10_000.0
    compute_dtype: str | None = None  # see PaliGemmaConfig.replace and pali_kit/model/common.py

    def __post_init__(self):
        _check_compute_dtype(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.query_pre_attn_norm not in ("rsqrt_head_dim", "rsqrt_emb_per_head"):
            raise ValueError(
                f"query_pre_attn_norm={self.query_pre_attn_norm!r}: use 'rsqrt_head_dim' "
                "or 'rsqrt_emb_per_head'"
            )

    @property
    def query_scale(self) -> float:
        if self.query_pre_attn_norm == "rsqrt_emb_per_head":
            return (self.width // self.num_heads) ** -0.5
        return self.head_dim**-0.5

    @property
    def is_gemma2(self) -> bool:
        return self.post_norms


@dataclass(frozen=True)
class PaliGemmaConfig:
    """The whole model: a SigLIP tower whose ``head`` projects to the LLM width."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: GemmaConfig = field(default_factory=GemmaConfig)

    @property
    def resolution(self) -> int:
        return self.vision.image_size

    @property
    def compute_dtype(self) -> str | None:
        """None: the numerics policy (float32 activations, range-safe half-precision
        products); or the dtype every matmul operand is cast to (see docs/differences.md)."""
        return self.llm.compute_dtype

    @property
    def family(self) -> str:
        return "paligemma2" if self.llm.is_gemma2 else "paligemma"

    def replace(self, **overrides) -> PaliGemmaConfig:
        """A copy with fields changed by name.

        Names unique to one tower (``final_logits_softcap``, ``image_size``,
        ``num_kv_heads``, ...) are used as they are; names both towers have
        (``width``, ``depth``, ``mlp_dim``, ``num_heads``, ``head_dim``) need a
        prefix: ``llm_depth=2``, ``img_width=32``. ``resolution`` is an alias of
        ``image_size``. ``compute_dtype`` sets both towers.
        """
        vis_fields = {f.name for f in dataclasses.fields(VisionConfig)} | {"head_dim"}
        llm_fields = {f.name for f in dataclasses.fields(GemmaConfig)}
        vis, llm = {}, {}
        for name, value in overrides.items():
            if name == "resolution":
                name = "image_size"
            if name == "compute_dtype":
                vis[name] = llm[name] = value
                continue
            if name.startswith("img_") and name[4:] in vis_fields:
                vis[name[4:]] = value
            elif name.startswith("llm_") and name[4:] in llm_fields:
                llm[name[4:]] = value
            elif name in vis_fields and name in llm_fields:
                raise TypeError(
                    f"override {name!r} exists in both towers: write img_{name}= or llm_{name}="
                )
            elif name in llm_fields:
                llm[name] = value
            elif name in vis_fields:
                vis[name] = value
            else:
                known = sorted((vis_fields | llm_fields) - {"head_dim"})
                raise TypeError(f"unknown config field {name!r}; known fields: {', '.join(known)}")
        if "head_dim" in vis:
            raise TypeError("the vision head dim follows from img_width / img_num_heads")
        return PaliGemmaConfig(
            vision=dataclasses.replace(self.vision, **vis),
            llm=dataclasses.replace(self.llm, **llm),
        )


def _check_compute_dtype(config) -> None:
    value = config.compute_dtype
    if value is None:
        return
    try:
        import numpy as np

        name = value if isinstance(value, str) else np.dtype(value).name
    except TypeError:
        name = repr(value)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"compute_dtype={value!r}: use None (the default numerics policy: float32 "
            "activations, range-safe products with half-precision weights), 'float32', "
            "'bfloat16' or 'float16'"
        )
    object.__setattr__(config, "compute_dtype", name)  # normalised: a hashable name


# --- The LLM variants (big_vision gemma.get_config) ---------------------------

GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(),
    "gemma2_2b": GemmaConfig(
        variant="gemma2_2b", width=2304, depth=26, mlp_dim=9216, num_heads=8,
        num_kv_heads=4, head_dim=256, post_norms=True, attn_logits_softcap=50.0,
    ),
    "gemma2_9b": GemmaConfig(
        variant="gemma2_9b", width=3584, depth=42, mlp_dim=14_336, num_heads=16,
        num_kv_heads=8, head_dim=256, post_norms=True, attn_logits_softcap=50.0,
    ),
    "gemma2_27b": GemmaConfig(
        variant="gemma2_27b", width=4608, depth=46, mlp_dim=36_864, num_heads=32,
        num_kv_heads=16, head_dim=128, post_norms=True, attn_logits_softcap=50.0,
        query_pre_attn_norm="rsqrt_emb_per_head",
    ),
}  # fmt: skip
# PaliGemma 2 defaults to final_logits_softcap=0.0: how the models were trained
# and transferred in the reference (big_vision's own default of 30.0 is only
# ever applied in decode-extend steps there).

PG2_SIZES = {"3b": "gemma2_2b", "10b": "gemma2_9b", "28b": "gemma2_27b"}


def paligemma_config(variant: str = "gemma_2b", resolution: int = 224) -> PaliGemmaConfig:
    """The config of an official PaliGemma (``gemma_2b``) or PaliGemma 2 model."""
    try:
        llm = GEMMA_VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown LLM variant {variant!r}; known: {list(GEMMA_VARIANTS)}"
        ) from None
    return PaliGemmaConfig(vision=VisionConfig(image_size=resolution), llm=llm)


# --- The registry of official checkpoints ------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """Where an official checkpoint lives and how to run it."""

    name: str
    config: PaliGemmaConfig
    text_len: int  # prefix + suffix tokens used in training (spec 5.5)
    kaggle_handle: str  # for kagglehub.model_download
    kaggle_file: str  # the .npz inside the Kaggle model version
    hf_repo: str  # transformers-format repo on the Hugging Face Hub
    hf_jax_repo: str | None = None  # repo holding the same .npz, when one is known

    @property
    def resolution(self) -> int:
        return self.config.resolution


def _text_len(kind: str, res: int) -> int:
    if kind == "pt":
        return 128 if res == 224 else 512
    if kind == "mix":
        return 256 if res == 224 else 512
    return {224: 128, 448: 512, 896: 512}[res]  # ft transfers: the pt length


def _pg1(kind: str, res: int, task: str | None = None) -> CheckpointInfo:
    name = f"paligemma-3b-{kind}-{res}" if task is None else f"paligemma-3b-ft-{task}-{res}"
    page = "paligemma" if kind != "ft" else "paligemma-ft"
    return CheckpointInfo(
        name=name,
        config=paligemma_config("gemma_2b", res),
        text_len=_text_len(kind, res),
        kaggle_handle=f"google/{page}/jax/{name}",
        kaggle_file=f"{name}.f16.npz" if kind != "ft" else f"{name}.npz",
        hf_repo=f"google/{name}",
        hf_jax_repo=f"google/{name}-jax",
    )


def _pg2(size: str, kind: str, res: int) -> CheckpointInfo:
    name = f"paligemma2-{size}-{kind}-{res}"
    return CheckpointInfo(
        name=name,
        config=paligemma_config(PG2_SIZES[size], res),
        text_len=_text_len(kind, res),
        kaggle_handle=f"google/paligemma-2/jax/{name}",
        kaggle_file=f"{name}.b16.npz",
        hf_repo=f"google/{name}",
    )


# The PaliGemma 1 transfers published with the release (HF "-jax" repo names).
PG1_TRANSFERS: dict[str, tuple[int, ...]] = {
    "ai2d": (224, 448), "aokvqa-da": (224, 448), "aokvqa-mc": (224, 448),
    "chartqa": (224, 448), "cococap": (224, 448), "cococap-35l": (224, 448),
    "docvqa": (224, 448), "gqa": (224, 448), "infovqa": (224, 448),
    "nlvr2": (224, 448), "ocrvqa": (224, 448, 896), "okvqa": (224, 448),
    "refcoco-seg": (224, 448, 896), "rsvqa-hr": (224, 448), "rsvqa-lr": (224, 448),
    "scicap": (224, 448), "science-qa": (224, 448), "screen2words": (224, 448),
    "tallyqa": (224, 448), "textcaps": (224, 448), "textvqa": (224, 448, 896),
    "vizwizvqa": (224, 448), "vqav2": (224, 448), "widgetcap": (224, 448),
    "xm3600": (224, 448), "docci": (448,),
}  # fmt: skip

_FT_PATTERN = re.compile(r"^paligemma-3b-ft-(?P<task>[a-z0-9-]+)-(?P<res>224|448|896)$")


def _build_registry() -> dict[str, CheckpointInfo]:
    reg: dict[str, CheckpointInfo] = {}
    for res in (224, 448, 896):
        reg[f"paligemma-3b-pt-{res}"] = _pg1("pt", res)
    for res in (224, 448):
        reg[f"paligemma-3b-mix-{res}"] = _pg1("mix", res)
    for task, resolutions in PG1_TRANSFERS.items():
        for res in resolutions:
            info = _pg1("ft", res, task)
            reg[info.name] = info
    for size in PG2_SIZES:
        for res in (224, 448, 896):
            info = _pg2(size, "pt", res)
            reg[info.name] = info
        for res in (224, 448):
            info = _pg2(size, "mix", res)
            reg[info.name] = info
    for size in ("3b", "10b"):
        info = _pg2(size, "ft-docci", 448)
        reg[info.name] = info
    return reg


CHECKPOINTS: dict[str, CheckpointInfo] = _build_registry()


def checkpoint_info(name: str) -> CheckpointInfo:
    """Registry lookup that also accepts any ``paligemma-3b-ft-<task>-<res>`` name."""
    if name in CHECKPOINTS:
        return CHECKPOINTS[name]
    m = _FT_PATTERN.match(name)
    if m:
        return _pg1("ft", int(m["res"]), m["task"])
    from .errors import UnknownNameError, did_you_mean

    raise UnknownNameError(
        f"unknown checkpoint {name!r}{did_you_mean(name, CHECKPOINTS)}. Known names look like "
        "'paligemma-3b-pt-224', 'paligemma2-10b-mix-448': see pk.CHECKPOINTS or `pali-kit info`"
    )


def resolve_config(name_or_config) -> PaliGemmaConfig:
    """A registry name, a ``CheckpointInfo`` or a ``PaliGemmaConfig`` -> config."""
    if isinstance(name_or_config, PaliGemmaConfig):
        return name_or_config
    if isinstance(name_or_config, CheckpointInfo):
        return name_or_config.config
    if isinstance(name_or_config, str):
        return checkpoint_info(name_or_config).config
    raise TypeError(f"expected a checkpoint name or PaliGemmaConfig, got {type(name_or_config)}")


def registry_semantics(inferred: PaliGemmaConfig, registered: PaliGemmaConfig):
    """Shapes say the architecture; the registry adds what shapes can't (query scale, softcaps)."""
    llm = inferred.llm
    return inferred.replace(
        query_pre_attn_norm=registered.llm.query_pre_attn_norm,
        attn_logits_softcap=registered.llm.attn_logits_softcap,
        final_logits_softcap=registered.llm.final_logits_softcap,
        llm_variant=registered.llm.variant if llm.variant == "custom" else llm.variant,
    )
