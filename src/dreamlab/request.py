"""The request: the one schema the CLI, HTTP API and web UI all build, its input images, and their codec."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.noise import MAX_SEED
from .core.samplers import get_sampler
from .core.schedules import Spacing
from .compose.collage import Box, CollageSpec
from .compose.outpaint import OutpaintSpec
from .errors import InvalidRequestError
from .inputs import INPUT_IMAGES, INPUTS, InputImage  # noqa: F401  (the request's input images, listed once)

MAX_BATCH = 16
MAX_STEPS = 1000
MAX_SIDE = 2048
MAX_PROMPT_CHARS = 2000
MAX_IMAGE_B64_CHARS = 12_000_000  # about 9 MB of encoded image
MAX_PROMPT_PARTS = 8  # composed prompts: each part costs one more network row per step
MAX_PART_WEIGHT = 10.0

_AND = re.compile(r"(?<!\S)AND(?!\S)")  # a word of its own: "ANDROID", "bAND" are text
_WEIGHT = re.compile(r"^(?P<text>.*?)(?:\s+|^):\s*(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+))\s*$", re.DOTALL)


def split_prompt(prompt: str) -> list[tuple[str, float]]:
    """The parts of a composed prompt and their weights: "a cat AND a hat :0.5 AND snow :-1" ->
    [("a cat", 1.0), ("a hat", 0.5), ("snow", -1.0)] (composable diffusion, Liu et al. 2022; the
    syntax of the AUTOMATIC1111 web UI). Parts are separated by an upper-case AND standing alone; a
    weight follows its part after a space and a colon. A prompt without AND is one part, left exactly as
    written (a colon in it is text). Raises InvalidRequestError for an empty part, more than
    MAX_PROMPT_PARTS parts, or a weight outside +-MAX_PART_WEIGHT."""
    pieces = _AND.split(prompt)
    if len(pieces) == 1:
        return [(prompt, 1.0)]
    if len(pieces) > MAX_PROMPT_PARTS:
        raise InvalidRequestError(f"the prompt composes {len(pieces)} parts with AND; at most {MAX_PROMPT_PARTS}")
    parts = []
    for i, piece in enumerate(pieces, 1):
        m = _WEIGHT.match(piece)
        text, weight = (m["text"], float(m["weight"])) if m else (piece, 1.0)
        text = text.strip()
        if not text:
            raise InvalidRequestError(f"part {i} of the prompt (between ANDs) is empty")
        if not abs(weight) <= MAX_PART_WEIGHT:
            raise InvalidRequestError(f"part {i} of the prompt ({text!r}) has weight {weight}; at most {MAX_PART_WEIGHT} either way")
        parts.append((text, weight))
    return parts


MAX_CONTROLS = 4  # each ControlNet costs about half a UNet forward per row and step


class ControlRequest(BaseModel):
    """One ControlNet control: a map (or a picture to compute it from) of a condition, with its weight."""

    model_config = ConfigDict(extra="forbid")

    condition: str = Field(description="what the map shows: canny (edges) or shape (silhouette)")
    image: str = Field(max_length=MAX_IMAGE_B64_CHARS, description="base64 PNG/JPEG: the map, or a picture with preprocess")
    scale: float = Field(1.0, ge=0.0, le=5.0, description="weight of its residuals; 0 = no control")
    start: float = Field(0.0, ge=0.0, le=1.0, description="share of the steps before it starts")
    end: float = Field(1.0, ge=0.0, le=1.0, description="share of the steps after which it stops")
    preprocess: bool = Field(False, description="compute the map from a picture (e.g. Canny edges of a photo)")

    @field_validator("condition")
    @classmethod
    def _known_condition(cls, v: str) -> str:
        from .control.conditions import get_condition

        get_condition(v)  # raises UnknownNameError listing the known ones
        return v


MAX_LORAS = 8
_LORA_TAG = re.compile(r"<lora:(?P<name>[^:<>]*)(?::(?P<scale>[^:<>]*))?>")


class LoraRequest(BaseModel):
    """A LoRA by name (installed, or registered with --lora PATH) at a scale; 0 = the base model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[\w.+-]{1,100}$", description="its folder or file name, as `dreamlab adapters` lists it")
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class ImagicRequest(BaseModel):
    """Imagic (docs/personalization.md): sample a prepared edit of an image at an interpolation eta."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[\w.+-]{1,100}$", description="the prepared edit (its cache folder's name)")
    eta: float = Field(0.7, ge=0.0, le=2.0, description="0: the image; 1: the target text")


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's prompt syntax: "a cat <lora:my-style:0.8>" -> ("a cat", [{"name": "my-style", "scale": 0.8}])."""
    found = []
    for m in _LORA_TAG.finditer(prompt):
        scale = m["scale"].strip() if m["scale"] is not None else "1"
        try:
            value = float(scale)
        except ValueError:
            raise InvalidRequestError(f"{m[0]}: the scale {scale!r} is not a number") from None
        if not m["name"].strip():
            raise InvalidRequestError(f"{m[0]}: the LoRA has no name")
        found.append({"name": m["name"].strip(), "scale": value})
    if not found:
        return prompt, []
    return re.sub(r"\s{2,}", " ", _LORA_TAG.sub("", prompt)).strip().strip(",").strip(), found


MAX_EDIT_WORDS = 8


class EditSpec(BaseModel):
    """Text-driven editing (docs/editing.md): the request's prompt is the source, ``target`` the edit.
    Without an init image the source is generated beside the edit; with one, it is inverted first."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(max_length=MAX_PROMPT_CHARS, description="the edited prompt")
    mode: Literal["auto", "replace", "refine"] = Field(
        "auto", description="replace: swap words of equal token counts; refine: words added; auto: replace if it can")
    cross_replace: float = Field(0.8, ge=0.0, le=1.0, description="share of the steps with the source's cross-attention")
    cross_replace_words: dict[str, float] = Field(default_factory=dict, max_length=MAX_EDIT_WORDS,
                                                  description="that share per word of the target")
    self_replace: float = Field(0.4, ge=0.0, le=1.0, description="share of the steps with the source's self-attention")
    reweight: dict[str, float] = Field(default_factory=dict, max_length=MAX_EDIT_WORDS,
                                       description="scale of the attention to words of the target, e.g. {'red': 2}")
    local_blend: list[str] = Field(default_factory=list, max_length=MAX_EDIT_WORDS,
                                   description="words whose attention masks the edit; outside, the source stays")
    blend_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    inversion: Literal["ddim", "null-text"] = Field("null-text", description="how a given image is inverted")
    null_text_iters: int = Field(10, ge=1, le=50, description="null-text inversion: Adam steps per sampling step")
    auto_mask: bool = Field(False, description="DiffEdit: find the region from the prompts, then inpaint it")
    mask_threshold: float = Field(0.25, gt=0.0, lt=1.0, description="DiffEdit: 0.25 measured best here (docs/editing.md)")
    mask_noises: int = Field(10, ge=1, le=64)
    mask_strength: float = Field(0.8, gt=0.0, le=1.0, description="DiffEdit: share of the schedule re-run in the mask")

    @field_validator("cross_replace_words", "reweight")
    @classmethod
    def _bounded(cls, v: dict[str, float]) -> dict[str, float]:
        for word, x in v.items():
            if not 0.0 <= x <= 10.0 or not word.strip():
                raise ValueError(f"{word!r}: a word and a value within 0..10")
        return v


MAX_REGIONS = 8
MAX_VIEWS = 4


class RegionRequest(BaseModel):
    """A part of the canvas with its own prompt: a pixel box (x0, y0, x1, y1) or a mask image (white = in)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    box: Box | None = None
    mask: str | None = Field(None, max_length=MAX_IMAGE_B64_CHARS, description="base64 image, white = the region")


class IllusionSpec(BaseModel):
    """Visual anagrams: the image reads as prompts[i] under views[i] (views[0] is normally identity)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=MAX_VIEWS)
    views: list[str] = Field(min_length=1, max_length=MAX_VIEWS)

    @field_validator("views")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from .compose.views import get_view

        for name in v:
            get_view(name)
        return v


class ILVRSpec(BaseModel):
    """Iterative latent variable refinement toward a reference image's low frequencies."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(max_length=MAX_IMAGE_B64_CHARS, description="base64 PNG/JPEG")
    factor: int = Field(16, ge=1, le=512, description="down/up-sampling factor N in pixels (a multiple of the latent factor)")


class GenerationRequest(BaseModel):
    """Everything that determines an image, given the model. The CLI, HTTP API and web UI all build one."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i of the batch uses seed + i; None draws one")
    # None: the model's default (its dreamlab.json; 30 dpmpp_2m karras steps at CFG 5 unless it says otherwise)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    sampler: str | None = None
    schedule: Spacing | None = None
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0, description="classifier-free guidance scale; 1 = no guidance")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    eta: float | None = Field(None, ge=0.0, le=1.0, description="noise of ddim / ancestral / sde samplers")
    dynamic_threshold: float | None = Field(None, gt=0.0, le=1.0, description="Imagen percentile, pixel models")
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    init_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="img2img / inpainting source: base64 PNG or JPEG"
    )
    strength: float = Field(0.75, ge=0.0, le=1.0, description="img2img: share of the schedule re-run (SDEdit)")
    mask_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="inpainting mask, base64 image: white = repaint"
    )
    lowres_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="super-resolution models: the image to enlarge, base64"
    )
    noise_level: int | None = Field(
        None, ge=0, le=999, description="super-resolution: noise added to the low-res input (a timestep); None = the model's"
    )
    source_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="instruction-editing models: the image the prompt (an "
        "instruction, 'make it green') edits, base64"
    )
    image_cfg_scale: float | None = Field(
        None, ge=0.0, le=50.0, description="instruction editing: image guidance scale s_I (1 = none); None = the model's"
    )
    controls: list[ControlRequest] = Field(default_factory=list, max_length=MAX_CONTROLS,
                                           description="ControlNet controls; their residuals add up")
    edit: EditSpec | None = Field(None, description="edit the prompt's image by editing the prompt (prompt-to-prompt)")
    regions: list[RegionRequest] = Field(default_factory=list, max_length=MAX_REGIONS,
                                         description="regional prompts; the prompt is the global one")
    window: int | None = Field(None, ge=8, le=MAX_SIDE, description="MultiDiffusion: window side in pixels "
                               "(the model's own size is usual); None: the canvas at once")
    window_stride: int | None = Field(None, ge=8, le=MAX_SIDE, description="pixels between windows (default: half a window)")
    illusion: IllusionSpec | None = None
    ilvr: ILVRSpec | None = None
    collage: CollageSpec | None = Field(None, description="a scene from ordered RGBA layers (docs/composition.md)")
    outpaint: OutpaintSpec | None = Field(None, description="extend init_image beyond its borders (docs/composition.md)")
    imagic: ImagicRequest | None = Field(None, description="an Imagic edit prepared by `dreamlab imagic`")
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS,
                                     description="LoRAs merged into the model for this request (also <lora:NAME:SCALE> in the prompt)")

    @model_validator(mode="before")
    @classmethod
    def _lora_tags(cls, data: Any) -> Any:
        """<lora:NAME:SCALE> in the prompt or negative prompt moves into ``loras`` (a tag overrides a listed
        LoRA of the same name)."""
        if not isinstance(data, dict):
            return data
        tagged: list[dict[str, Any]] = []
        for key in ("prompt", "negative_prompt"):
            if isinstance(data.get(key), str) and "<lora:" in data[key]:
                data = {**data}
                data[key], found = lora_tags(data[key])
                tagged += found
        if tagged:
            names = {t["name"] for t in tagged}
            listed = [x for x in (data.get("loras") or []) if not (isinstance(x, dict) and x.get("name") in names)]
            data["loras"] = [*listed, *tagged]
        return data

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str | None) -> str | None:
        if v is not None:
            get_sampler(v)  # raises UnknownNameError listing the known ones
        return v

    @field_validator("prompt")
    @classmethod
    def _composable(cls, v: str) -> str:
        split_prompt(v)  # raises InvalidRequestError naming the bad part
        return v


def encode_image(image: Image.Image | str | Path) -> str:
    """A PIL image (as PNG) or an image file (its bytes unchanged, once checked to be a readable image)
    -> the base64 string requests carry. Keeping a file's bytes makes the manifest's hash its sha256sum."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    try:
        data = Path(image).read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {image}: {e.strerror or e}") from None
    open_image(data, str(image))
    return base64.b64encode(data).decode("ascii")


def open_image(data: bytes, what: str, *, load: bool = True) -> Image.Image:
    """The image in ``data``; ``load=False`` reads only its header (size, mode), not its pixels."""
    try:
        image = Image.open(io.BytesIO(data))
        if load:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"{what} is not a readable image ({e})") from None
    if max(image.size) > 4 * MAX_SIDE:
        raise InvalidRequestError(f"{what} is too large ({image.size[0]}x{image.size[1]})")
    return image


def image_bytes(b64: str, what: str) -> bytes:
    """The file bytes a base64 request field carries (an optional data: URL prefix is allowed)."""
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None


def decode_image(b64: str, what: str) -> Image.Image:
    return open_image(image_bytes(b64, what), what)


def image_sha256(b64: str, what: str = "image") -> str:
    """How manifests record an input image: "sha256:" + the hash of its file bytes (= sha256sum FILE)."""
    return "sha256:" + hashlib.sha256(image_bytes(b64, what)).hexdigest()


def format_validation_error(e: ValidationError) -> str:
    """One line naming each bad field."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def make_request(**kwargs: Any) -> GenerationRequest:
    """Build a request, turning validation errors into one-line :class:`InvalidRequestError`."""
    try:
        return GenerationRequest(**kwargs)
    except ValidationError as e:
        raise InvalidRequestError(format_validation_error(e)) from None




def image_fields(request: dict[str, Any], *, empty: bool = False) -> list[tuple[dict[str, Any], str, str]]:
    """Every image a request (as a dict) carries: (the dict holding it, its key, how messages name it),
    the top-level input images first, then those nested in controls, regions, ILVR and collage layers.
    ``empty``: also the fields set to an empty string (a server must refuse those, not skip them)."""
    def has(holder: dict[str, Any], key: str) -> bool:
        value = holder.get(key)
        return value is not None if empty else bool(value)

    found = [(request, key, key) for key in INPUT_IMAGES if has(request, key)]
    found += [(c, "image", f"controls.{i}.image") for i, c in enumerate(request.get("controls") or []) if has(c, "image")]
    found += [(r, "mask", f"regions.{i}.mask") for i, r in enumerate(request.get("regions") or []) if has(r, "mask")]
    if request.get("ilvr") and has(request["ilvr"], "reference"):
        found.append((request["ilvr"], "reference", "ilvr.reference"))
    layers = (request.get("collage") or {}).get("layers") or []
    found += [(layer, "image", f"collage.layers.{i}.image") for i, layer in enumerate(layers) if has(layer, "image")]
    return found


def recorded(request: dict[str, Any]) -> dict[str, Any]:
    """The request as a manifest records it: input images by the sha256 of their bytes, not inline
    (nested lists and dicts are copied, not changed in place)."""
    request = json.loads(json.dumps(request))
    for holder, key, what in image_fields(request):
        if not holder[key].startswith("sha256:"):
            holder[key] = image_sha256(holder[key], what)
    return request
