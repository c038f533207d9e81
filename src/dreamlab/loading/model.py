"""Load a model folder in diffusers' format into a :class:`ModelBundle`.

Layout (a Stable Diffusion diffusers folder is one; dreamlab's own models add ``dreamlab.json``):
    unet/            UNet2DConditionModel config + weights
    scheduler/       scheduler_config.json: the training betas and prediction_type
    vae/             AutoencoderKL (optional: without it the model works in pixel space)
    text_encoder/, tokenizer/   a transformers encoder (optional if dreamlab.json names a packaged one)
    dreamlab.json    optional, see :class:`ModelSpec`

A file instead of a folder is a single-file Stable Diffusion checkpoint (``single_file.py``).

Weights load from safetensors only; a folder with only pickled weights is refused unless
``allow_pickle=True`` (and then diffusers/transformers load them with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.prediction import Prediction
from ..core.samplers import SAMPLERS
from ..core.schedules import DiscreteSchedule, Spacing
from ..errors import DreamlabError, ModelNotFoundError
from ..models.bundle import CONCAT_INPUTS, Defaults, ModelBundle, ModelInput, Student, SuperResolution
from ..models.space import PixelSpace, VAESpace
from ..models.text import Pooling, TextEncoder
from .checkpoint import CHECKPOINT_SUFFIXES
from .files import folder_hashes, use_safetensors
from .text_encoders import load_clip_folder, load_folder_encoder, load_minilm

# diffusers pipelines whose text encoders are Stable Diffusion's CLIP (called the way SD was trained)
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class TextEncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # minilm: the pinned PyPI package, sha256-checked; clip: Stable Diffusion's CLIP encoder(s) in text_encoder/
    # (and text_encoder_2/: SDXL), as a folder whose model_index.json names an SD pipeline gets by default
    source: Literal["folder", "minilm", "clip"] = "folder"
    max_length: int | None = Field(None, ge=1, le=512)
    pooling: Pooling = "pooler"


class SuperResolutionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_size: int = Field(ge=1, le=4096, description="side of the low-resolution input it was trained on")
    noise_level: int = Field(0, ge=0, le=999, description="default conditioning augmentation, a timestep")


class CascadeSpec(BaseModel):
    """A cascade folder holds two model folders: a base model and a super-resolution stage."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field("base", pattern=r"^[A-Za-z0-9_.-]+$")
    sr: str = Field("sr", pattern=r"^[A-Za-z0-9_.-]+$")


class DefaultsSpec(BaseModel):
    """What the model samples with when a request leaves it unset (a 4-step student is not its teacher)."""

    model_config = ConfigDict(extra="forbid")
    sampler: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0)
    schedule: Spacing | None = None
    image_cfg_scale: float | None = Field(None, ge=0.0, le=50.0)  # instruction-editing models: s_I

    @field_validator("sampler")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in SAMPLERS:
            raise ValueError(f"unknown sampler '{v}'; known: {', '.join(sorted(SAMPLERS))}")
        return v


class StudentSpec(BaseModel):
    """A distilled few-step student (written by ``dreamlab train distill``; docs/distillation.md)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["consistency", "progressive"]
    teacher: str = ""  # its name
    teacher_unet: str | None = None  # sha256 of the teacher's UNet weights (its ControlNets fit the student)
    guidance: tuple[float, float] | None = None  # [min, max] of the guidance scales folded into its input

    @field_validator("guidance")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1]:
            raise ValueError(f"must be [min, max] with 0 <= min <= max, got {list(v)}")
        return v


class ModelSpec(BaseModel):
    """Contents of ``dreamlab.json``."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    sample_size: int | None = Field(None, ge=8, le=4096, description="default image size in pixels")
    use_mask: bool = False
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    latent_scale: float | None = None  # overrides vae.config.scaling_factor
    latent_shift: float | None = None
    super_resolution: SuperResolutionSpec | None = None  # this model is a super-resolution stage
    cascade: CascadeSpec | None = None  # this folder is a cascade of two model folders
    defaults: DefaultsSpec = DefaultsSpec()
    # extra inputs beside the prompt (a super_resolution stage takes "lowres_image" without saying so);
    # each of lowres_image and source_image adds the latent channels to the UNet's input
    inputs: list[ModelInput] = Field(default_factory=list)
    student: StudentSpec | None = None  # this model is a student distilled from a teacher
    training: dict[str, Any] = Field(default_factory=dict)  # what the trainer recorded: steps, train_hours, ...


def default_model_dir() -> Path:
    """Where the default model is looked for: $DREAMLAB_MODEL, else the weights shipped in the package."""
    env = os.environ.get("DREAMLAB_MODEL")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "weights" / "default"


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
NAMED_MODELS = ("default", "instruct", "fast")  # folders of the package's weights/ that --model names


def named_model(path: str | Path) -> Path:
    """``--model``'s folder: a path, or the name of a model shipped in the package (``default``,
    ``instruct``, ``fast``: ``weights/NAME``), when nothing of that name is in the working directory."""
    p = Path(path).expanduser()
    name = str(path)
    if p.exists() or name not in NAMED_MODELS:
        return p
    return default_model_dir() if name == "default" else SHIPPED_DIR / name


def installed_instruct_models(base_unet: str | None) -> list[Path]:
    """Folders of the package's weights/ (and of $DREAMLAB_MODELS, a colon-separated list of folders of
    model folders) holding an instruction-editing model made from the UNet whose sha256 is ``base_unet``."""
    if base_unet is None:
        return []
    roots = [SHIPPED_DIR, *(Path(p).expanduser() for p in os.environ.get("DREAMLAB_MODELS", "").split(os.pathsep) if p)]
    found = []
    for root in roots:
        for folder in sorted(root.glob("*")) if root.is_dir() else []:
            try:
                spec = json.loads((folder / "dreamlab.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(spec, dict) and (spec.get("instruct") or {}).get("base_unet") == base_unet:
                found.append(folder)
    return found


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    prediction: str | Prediction | None = None,
    config: str | Path | None = None,
) -> ModelBundle:
    """A model folder, or a single-file checkpoint (``.safetensors``; ``.ckpt`` with ``allow_pickle``).
    For a checkpoint, ``prediction`` overrides what the file says or implies (SD 2.x: v unless told) and
    ``config`` is a diffusers folder whose configs to use instead of the bundled ones."""
    explicit = path is not None
    root = named_model(path) if explicit else default_model_dir()
    with _loading_threads():
        if root.is_file() or root.suffix.lower() in CHECKPOINT_SUFFIXES:
            from .single_file import load_single_file

            return load_single_file(root, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                    prediction=prediction, config=config)
        if prediction is not None or config is not None:
            raise DreamlabError(f"{root} is a model folder: its scheduler_config.json says its prediction type and "
                                "its configs are its own (prediction and config are for single-file checkpoints)")
        spec = read_spec(root)
        if spec.cascade is not None:
            return _load_cascade(root, spec, device=device, dtype=dtype, allow_pickle=allow_pickle)
        return _load_folder(root, spec, explicit=explicit, device=device, dtype=dtype, allow_pickle=allow_pickle)


@contextmanager
def _loading_threads():
    """One intra-op thread while weights load, where that cannot touch anyone else's work.

    Loading is hundreds of small copies (diffusers casts each fp16 tensor to the model's dtype one by one):
    a second thread buys nothing at these sizes, and on a busy machine every copy waits at its barrier for
    a descheduled thread (docs/benchmarks.md, Start-up: the default model's UNet took 0.8 s of CPU with 2
    threads on a loaded 2-core machine, 0.07 s with 1). The copies are exact, so the weights are the same.
    The thread count is process-wide and sampling results depend on it, so it is left alone whenever
    another Python thread is alive (a server sampling while a model loads), and restored afterwards."""
    n = torch.get_num_threads()
    if n == 1 or threading.active_count() > 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _load_folder(
    root: Path, spec: ModelSpec, *, explicit: bool = True, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, allow_pickle: bool = False, text_encoder: TextEncoder | None = None,
) -> ModelBundle:
    """One model folder. ``text_encoder``: an encoder already loaded for what ``spec`` names (a cascade's
    two stages share the packaged one), used instead of loading it again."""
    if not (root / "unet").is_dir():
        if explicit and root.parent == SHIPPED_DIR and root.name in NAMED_MODELS and not root.exists():
            shipped = [n for n in NAMED_MODELS if (SHIPPED_DIR / n / "unet").is_dir() or n == "default"]
            raise ModelNotFoundError(f"no model named '{root.name}' ships with this dreamlab (named models here: "
                                     f"{', '.join(shipped)}); pass --model DIR with a model folder")
        if explicit:
            raise ModelNotFoundError(f"no model at {root} (expected a diffusers-format folder with unet/)")
        raise ModelNotFoundError(
            f"no trained model is installed (looked for the default model in {root}). "
            "Pass --model DIR with a diffusers-format model folder, or set DREAMLAB_MODEL"
        )
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise ModelNotFoundError(f"{root} has no scheduler/scheduler_config.json (the training noise schedule)")
    sched_cfg = json.loads(sched_file.read_text())
    from diffusers import AutoencoderKL, UNet2DConditionModel  # after the checks: a wrong path fails fast

    try:
        unet = UNet2DConditionModel.from_pretrained(
            root / "unet", use_safetensors=use_safetensors(root / "unet", allow_pickle), torch_dtype=dtype
        )
        space: PixelSpace | VAESpace
        if (root / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(
                root / "vae", use_safetensors=use_safetensors(root / "vae", allow_pickle), torch_dtype=dtype
            )
            space = VAESpace(vae.to(device), spec.latent_scale, spec.latent_shift)
        else:
            space = PixelSpace(int(unet.config.in_channels))
    except (OSError, ValueError) as e:
        raise DreamlabError(f"cannot load the model in {root}: {str(e).splitlines()[0]}") from None

    te = spec.text_encoder
    if int(unet.config.cross_attention_dim or 0) == 0:
        text_encoder = None
    elif text_encoder is None and te.source == "minilm":
        text_encoder = load_minilm(te.max_length or 32, device=str(device))
    elif text_encoder is None and (te.source == "clip" or ("text_encoder" not in spec.model_fields_set
                                                            and _sd_pipeline(root))):
        text_encoder = load_clip_folder(root, device=str(device), allow_pickle=allow_pickle)
    elif text_encoder is None:
        text_encoder = load_folder_encoder(
            root, max_length=te.max_length, pooling=te.pooling, device=str(device), allow_pickle=allow_pickle
        )
    if text_encoder is not None and text_encoder.dim != unet.config.cross_attention_dim:
        raise DreamlabError(
            f"text encoder width {text_encoder.dim} does not match the UNet's cross_attention_dim "
            f"{unet.config.cross_attention_dim} in {root}"
        )

    if unet.config.class_embed_type == "projection":  # the pooled prompt embedding, added to the timestep's
        pooled_dim = None if text_encoder is None or getattr(text_encoder, "pooling", "mean") == "none" else text_encoder.dim
        if pooled_dim != unet.config.projection_class_embeddings_input_dim:
            raise DreamlabError(
                f"the UNet in {root} adds a pooled prompt embedding of width "
                f"{unet.config.projection_class_embeddings_input_dim} to its timestep embedding, but its text encoder "
                + ("gives none" if pooled_dim is None else f"gives one of width {pooled_dim}")
            )
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        _check_text_time(root, unet, text_encoder)
    sample_size = spec.sample_size or int(unet.config.sample_size) * space.factor
    sr = None
    inputs = tuple(dict.fromkeys(spec.inputs))
    if spec.super_resolution is not None:
        sr = SuperResolution(spec.super_resolution.from_size, spec.super_resolution.noise_level)
        inputs = tuple(dict.fromkeys(("lowres_image", *inputs)))
        extra = int(unet.config.in_channels) - space.channels
        if extra != space.channels or unet.config.class_embed_type != "timestep":
            raise DreamlabError(
                f"{root} is described as a super-resolution stage but its UNet does not take one: it needs "
                f"{2 * space.channels} input channels (has {unet.config.in_channels}) and class_embed_type 'timestep'"
            )
    _check_channels(root, unet, space, inputs)
    student = None
    if spec.student is not None:
        student = Student(spec.student.method, spec.student.teacher, spec.student.teacher_unet, spec.student.guidance)
        if spec.student.guidance is not None and getattr(unet.config, "time_cond_proj_dim", None) is None:
            raise DreamlabError(f"{root}/dreamlab.json says guidance is folded into the student, but its UNet takes "
                                "no guidance input (time_cond_proj_dim)")
    return ModelBundle(
        unet=unet.to(device).eval().requires_grad_(False),
        text_encoder=text_encoder,
        space=space,
        schedule=DiscreteSchedule.from_diffusers_config(sched_cfg),
        prediction=Prediction(sched_cfg.get("prediction_type", "epsilon")),
        sample_size=sample_size,
        use_mask=spec.use_mask,
        name=spec.name or root.name,
        source=str(root.resolve()),
        files=folder_hashes(root),
        sr=sr,
        defaults=Defaults(**{k: v for k, v in spec.defaults.model_dump().items() if v is not None}),
        inputs=inputs,
        student=student,
    )


def _sd_pipeline(root: Path) -> bool:
    index = root / "model_index.json"
    try:
        return index.is_file() and json.loads(index.read_text()).get("_class_name") in SD_PIPELINES
    except ValueError:
        return False


def _check_text_time(root: Path, unet, text_encoder) -> None:
    """SDXL's added conditioning: the pooled prompt embedding and six size numbers, each embedded in
    addition_time_embed_dim, must make projection_class_embeddings_input_dim."""
    pooled = getattr(text_encoder, "pooled_dim", None)
    want = int(unet.config.projection_class_embeddings_input_dim)
    if pooled is None or pooled + 6 * int(unet.config.addition_time_embed_dim) != want:
        raise DreamlabError(f"the UNet in {root} takes SDXL's size and pooled-text conditioning ({want} numbers), "
                            "which its text encoder " + ("does not give" if pooled is None else
                                                         f"does not fit (pooled width {pooled})"))


def _check_channels(root: Path, unet, space, inputs: tuple[str, ...]) -> None:
    """The UNet must take the latent channels plus those of every concatenated input its spec declares."""
    if isinstance(space, PixelSpace):
        return  # a pixel model's channels are read from its UNet
    concat = [name for name in inputs if name in CONCAT_INPUTS]
    want = space.channels * (1 + len(concat))
    have = int(unet.config.in_channels)
    if have != want:
        said = f"declares the input(s) {', '.join(concat)}" if concat else "declares no concatenated input"
        raise DreamlabError(f"the UNet in {root} takes {have} input channels, but its dreamlab.json {said}: "
                            f"that needs {want} ({space.channels} latent channels each)")


def read_spec(root: Path) -> ModelSpec:
    """A model folder's ``dreamlab.json``, validated (defaults when there is none); the one reader of it."""
    file = root / "dreamlab.json"
    try:
        return ModelSpec.model_validate_json(file.read_text()) if file.exists() else ModelSpec()
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise DreamlabError(f"{file} is invalid: {where + ': ' if where else ''}{err['msg']}") from None


def _load_cascade(root: Path, spec: ModelSpec, **kw) -> ModelBundle:
    """A base model whose images a super-resolution stage enlarges (Ho et al. 2021)."""
    assert spec.cascade is not None
    base_spec, sr_spec = read_spec(root / spec.cascade.base), read_spec(root / spec.cascade.sr)
    base = _load_folder(root / spec.cascade.base, base_spec, **kw)
    same_encoder = base_spec.text_encoder.source == "minilm" and base_spec.text_encoder == sr_spec.text_encoder
    # the same packaged encoder: loaded (and its hash checked) once, one copy in memory
    sr = _load_folder(root / spec.cascade.sr, sr_spec, text_encoder=base.text_encoder if same_encoder else None, **kw)
    attach_upscaler(base, sr, str(root))
    base.name = spec.name or root.name
    base.source = str(root.resolve())
    base.files = folder_hashes(root)
    return base


def attach_upscaler(base: ModelBundle, sr: ModelBundle, where: str) -> None:
    """Make ``base`` a cascade whose images ``sr`` enlarges, after checking that the pair fits."""
    if base.sr is not None or base.upscaler is not None:
        raise DreamlabError(f"{where}: the base of a cascade must be a text-to-image model")
    if sr.sr is None:
        raise DreamlabError(f"{where}: {sr.source} is not a super-resolution stage (its dreamlab.json has no super_resolution)")
    if sr.sample_size % base.sample_size:
        raise DreamlabError(f"{where}: the SR stage's size {sr.sample_size} is not a multiple of the base's {base.sample_size}")
    base.upscaler = sr


def super_resolution_dir(path: str | Path) -> Path:
    """The super-resolution model folder at ``path``: the folder itself, or a cascade's SR stage."""
    root = Path(path).expanduser()
    spec = read_spec(root)
    return root / spec.cascade.sr if spec.cascade is not None else root
