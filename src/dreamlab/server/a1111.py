"""The AUTOMATIC1111-compatible API, under ``/sdapi/v1`` beside dreamlab's own ``/api``, for clients written
against the A1111 web UI (``webuiapi`` and the like). Another face of the same service: a generation is an
A1111 request translated into a ``GenerationRequest`` (``a1111_schema.py``) and queued by
``Service.submit`` (the same queue, limits and checks as ``POST /api/jobs``); the route then waits for the
job (``Service.follow``) and answers in A1111's shape with the gallery's PNGs, each carrying its
parameters text and dreamlab manifest. Errors on these routes have A1111's shape (``error_body``; app.py's
handlers use it for every path under ``PREFIX``)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import DreamlabError, UnknownNameError
from ..metadata import parse_parameters, weights_sha256
from ..request import image_bytes, open_image
from .a1111_schema import (
    SAMPLERS, SCHEDULERS, A1111Request, Img2ImgRequest, Settings, Txt2ImgRequest, a1111_message, a1111_sampler_name,
    a1111_scheduler_label, refused_settings, translate,
)
from .queue import Job, QueueFullError
from .service import JobFinishedError, JobView, Service

PREFIX = "/sdapi/v1"


# --- response models (A1111's, modules/api/models.py) -------------------------------------------------


class A1111Error(BaseModel):
    error: str = Field(description="the exception's type")
    detail: str = Field(description="what went wrong, one line")
    body: str
    errors: str


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs, each with its parameters text and dreamlab manifest")
    parameters: dict[str, Any] = Field(description="the request as read")
    info: str = Field(description="JSON text: prompt, all_seeds, infotexts, job_id, ...")


class ImageToImageResponse(TextToImageResponse):
    pass


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 image (a data: URL works too)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the parameters text")
    items: dict[str, Any] = Field(description="the image's other text chunks (dreamlab's manifest among them)")
    parameters: dict[str, Any] = Field(description="the parameters text's fields")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1")
    eta_relative: float = Field(description="seconds left, estimated")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="the running job's latest preview, base64 PNG")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class ScriptsList(BaseModel):
    txt2img: list[str] | None
    img2img: list[str] | None


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": A1111Error, "description": what} for code, what in (
    (404, "unknown sampler"), (422, "a field dreamlab cannot honour, or a bad value"),
    (429, "queue full"), (500, "the job failed"), (503, "stopped waiting for the job"))}


def error_body(exc: Exception, status: int, detail: str) -> dict[str, str]:
    """A1111's error shape (its api_middleware): the exception's type, the message, and str(exception)."""
    errors = f"{status}: {detail}" if isinstance(exc, HTTPException) else detail
    return {"error": type(exc).__name__, "detail": detail, "body": "", "errors": errors}


def settings_of(srv: Service) -> Settings:
    """This server's A1111 options: the one model as its checkpoint, and the settings dreamlab has."""
    model = srv.model
    sha = weights_sha256(model.files)
    short = sha[:10] if sha else None
    title = f"{model.name} [{short}]" if short else model.name
    options = {
        "sd_model_checkpoint": title, "sd_checkpoint_hash": sha, "samples_format": "png", "enable_pnginfo": True,
        "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ancestral": 1.0, "eta_ddim": 0.0,
        "show_progress_every_n_steps": srv.worker.preview_every,
    }
    names = {title, model.name, short, sha, Path(model.source).name if model.source else None}
    return Settings(options, frozenset(n for n in names if n), model.defaults.sampler)


def a1111_router(srv: Service) -> APIRouter:
    settings = settings_of(srv)
    sha = settings.options["sd_checkpoint_hash"]
    model_item = SDModelItem(title=settings.options["sd_model_checkpoint"], model_name=srv.model.name,
                             hash=sha[:10] if sha else None, sha256=sha, filename=srv.model.source or srv.model.name,
                             config=None)
    router = APIRouter(prefix=PREFIX, tags=["a1111"], responses={422: ERRORS[422]})

    @router.post("/txt2img", response_model=TextToImageResponse, responses=ERRORS)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> TextToImageResponse:
        """Text to image: A1111's fields, one job of batch_size x n_iter images (image i: seed + i)."""
        return TextToImageResponse(**await _generate(srv, settings, body, request))

    @router.post("/img2img", response_model=ImageToImageResponse, responses=ERRORS)
    async def img2img(body: Img2ImgRequest, request: Request) -> ImageToImageResponse:
        """img2img from one init image; inpainting with a mask (white = repaint)."""
        return ImageToImageResponse(**await _generate(srv, settings, body, request))

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        """The running job's progress (any job, whichever face queued it), and its latest preview."""
        return _progress(srv.running(), skip_current_image)

    @router.post("/interrupt", response_model=dict[str, Any])
    def interrupt() -> dict[str, Any]:
        """Cancel the running job (it stops at its next step; its request answers without images)."""
        view = srv.running()
        if view is not None:
            try:
                srv.cancel(view.job.id)
            except JobFinishedError:
                pass  # it ended meanwhile
        return {}

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[SDModelItem]:
        """The one model this server serves."""
        return [model_item]

    @router.get("/loras", response_model=list[dict[str, Any]])
    def loras() -> list[dict[str, Any]]:
        """The installed LoRAs, for <lora:NAME:SCALE> in prompts (A1111's Lora extension's endpoint)."""
        return [{"name": n, "alias": n, "path": n, "metadata": {}} for n in sorted(srv.model.adapters.known("lora"))]

    @router.get("/embeddings", response_model=dict[str, Any])
    def embeddings() -> dict[str, Any]:
        """The installed textual-inversion embeddings, by token."""
        adapters = srv.model.adapters
        loaded = {}
        for token, path in sorted(adapters.known("embedding").items()):
            e = adapters.embedding(path)
            loaded[token] = {"step": e.meta.get("steps"), "sd_checkpoint": None, "sd_checkpoint_name": e.meta.get("base_model"),
                             "shape": int(e.vectors.shape[-1]), "vectors": int(e.vectors.shape[0])}
        return {"loaded": loaded, "skipped": {}}

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers() -> list[SamplerItem]:
        """The A1111 samplers dreamlab implements; their aliases include dreamlab's names."""
        return [SamplerItem(name=s.name, aliases=list(s.aliases), options={}) for s in SAMPLERS]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[SchedulerItem]:
        return [SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None, default_rho=s.default_rho,
                              need_inner_model=s.need_inner_model) for s in SCHEDULERS]

    @router.get("/options", response_model=dict[str, Any])
    def get_options() -> dict[str, Any]:
        """The settings dreamlab has, as A1111 names them."""
        return settings.options

    @router.post("/options", responses={422: ERRORS[422]})
    def set_options(changes: dict[str, Any]) -> None:
        """Accepted only where it changes nothing (this server has one model and fixed settings)."""
        problems = refused_settings(changes, settings)
        if problems:
            raise HTTPException(422, "; ".join(problems))

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(body: PNGInfoRequest) -> PNGInfoResponse:
        """The parameters text of an image (dreamlab's PNGs and A1111's alike) and its other text chunks."""
        if not body.image.strip():
            return PNGInfoResponse(info="", items={}, parameters={})
        try:
            image = open_image(image_bytes(body.image.strip(), "image"), "image")
        except DreamlabError as e:
            raise HTTPException(422, str(e)) from None
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        info = items.pop("parameters", "")
        return PNGInfoResponse(info=info, items=items, parameters=parse_parameters(info) if info else {})

    @router.get("/scripts", response_model=ScriptsList)
    def scripts() -> ScriptsList:
        """None: dreamlab runs no A1111 scripts (clients such as webuiapi ask at start)."""
        return ScriptsList(txt2img=[], img2img=[])

    return router


async def _generate(srv: Service, settings: Settings, body: A1111Request, request: Request) -> dict[str, Any]:
    job = await run_in_threadpool(_submit, srv, settings, body)
    ended = None
    async for update in srv.follow(job.id, stop=request.is_disconnected):
        ended = update.view if update.final else None
    if ended is None:
        raise HTTPException(503, f"stopped waiting for job {job.id}; it goes on: GET /api/jobs/{job.id}")
    if ended.state == "failed":
        raise HTTPException(500, f"job {job.id} failed: {ended.job.error}")
    view = srv.view(srv.job(job.id) or ended.job)  # with its request, which follow's views leave out
    images = []
    if body.send_images:  # the gallery's files, as stored
        images = [_b64(path.read_bytes()) for im in view.images if (path := srv.image_path(im)) is not None]
    hidden = {} if not isinstance(body, Img2ImgRequest) or body.include_init_images else {"init_images": None, "mask": None}
    return {"images": images, "parameters": {**body.model_dump(), **hidden}, "info": json.dumps(_info(srv, view, settings, body))}


def _submit(srv: Service, settings: Settings, body: A1111Request) -> Job:
    try:
        return srv.submit(translate(body, settings))
    except UnknownNameError as e:  # an unknown sampler: A1111 answers 404
        raise HTTPException(404, str(e)) from None
    except QueueFullError as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None
    except DreamlabError as e:
        raise HTTPException(422, a1111_message(str(e))) from None


def _info(srv: Service, view: JobView, settings: Settings, body: A1111Request) -> dict[str, Any]:
    """What A1111's ``Processed.js()`` reports, from the job as run and its images' records."""
    req, job = view.job.request, view.job
    seeds = [im.seed for im in view.images] or [req["seed"] + i for i in range(req["batch"])]
    width = view.images[0].width if view.images else req["width"] or srv.model.sample_size
    height = view.images[0].height if view.images else req["height"] or srv.model.sample_size
    sha = settings.options["sd_checkpoint_hash"]
    return {
        "prompt": req["prompt"], "all_prompts": [req["prompt"]] * len(seeds), "negative_prompt": req["negative_prompt"],
        "all_negative_prompts": [req["negative_prompt"]] * len(seeds), "seed": req["seed"], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": a1111_sampler_name(req["sampler"]), "cfg_scale": req["cfg_scale"], "steps": req["steps"],
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": srv.model.name, "sd_model_hash": sha[:10] if sha else None, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req["strength"] if req.get("init_image") else None,
        "extra_generation_params": {"Schedule type": a1111_scheduler_label(req["schedule"])},
        "index_of_first_image": 0, "infotexts": [srv.parameters(im) for im in view.images], "styles": [],
        "job_timestamp": _timestamp(job.started or job.created), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"dreamlab {__version__}",
        "job_id": job.id, "state": job.state,
    }


def _progress(view: JobView | None, skip_current_image: bool) -> ProgressResponse:
    state: dict[str, Any] = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                             "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if view is None:
        return ProgressResponse(progress=0, eta_relative=0, state=state)
    job = view.job
    started = job.started or time.time()
    fraction = view.step / view.total if view.total else 0.0
    elapsed = max(time.time() - started, 0.0)
    # one job is one run of total steps (its images one after another), so job_count is 1
    state.update(interrupted=job.cancel_requested, job=job.id, job_count=1, job_timestamp=_timestamp(started),
                 sampling_step=view.step, sampling_steps=view.total)
    image = _b64(view.preview) if view.preview is not None and not skip_current_image else None
    return ProgressResponse(progress=fraction, eta_relative=elapsed / fraction - elapsed if fraction else 0.0,
                            state=state, current_image=image, textinfo=f"step {view.step} / {view.total}")


def _timestamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
