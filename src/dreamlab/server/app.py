"""The HTTP face of the server: the FastAPI app factory, its routes and response models. Thin: each route
calls the service (``service.py``: checks, queue, gallery, following a job) and turns what it returns into
JSON; the worker runs ``generate``. dreamlab's routes are under ``/api``, the AUTOMATIC1111-compatible ones
under ``/sdapi/v1`` (``a1111.py``), the offline API docs at ``/docs`` and ``/redoc`` (``docs.py``); the Gradio
web UI (``ui.py``, the other face of the same service) is mounted at ``/``."""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..core.samplers import SAMPLERS, STOCHASTIC
from ..core.schedules import SPACINGS
from ..errors import DreamlabError, InvalidRequestError, UnknownNameError
from ..generate import GenerationRequest
from ..models.bundle import ModelBundle
from . import a1111
from .a1111_schema import NO_OPS
from .docs import mount_docs
from .queue import ImageRecord, Job, JobState, QueueFullError, QueueUnavailableError
from .service import JobFinishedError, JobView, Limits, Service  # Limits: create_app's, importable from here too

if TYPE_CHECKING:
    from .redis_queue import RedisQueue

JOB_ID = r"^[0-9a-f]{32}$"
IMAGE_ID = r"^[0-9a-f]{32}-[0-9]{1,2}$"
SHA256 = r"^[0-9a-f]{64}$"

JobIdParam = Annotated[str, PathParam(pattern=JOB_ID, description="32 hex digits")]
ImageIdParam = Annotated[str, PathParam(pattern=IMAGE_ID, description="'<job id>-<index>'")]
Sha256Param = Annotated[str, PathParam(pattern=SHA256, description="64 hex digits")]


# --- response models (they make the OpenAPI schema say what comes back) ------------------------------


class ImageOut(BaseModel):
    id: str
    job_id: str
    index: int
    seed: int
    width: int
    height: int
    prompt: str
    negative_prompt: str
    created: float
    url: str = Field(description="the PNG, with its parameters chunk and dreamlab manifest")
    metadata_url: str


class JobOut(BaseModel):
    id: str
    state: JobState
    created: float
    started: float | None
    finished: float | None
    attempts: int
    error: str | None
    position: int | None = Field(description="queued jobs ahead of this one")
    step: int
    total: int
    preview_url: str | None
    images: list[ImageOut]
    request: dict[str, Any] = Field(description="the request as run: seed fixed, input images as sha256")


class JobList(BaseModel):
    items: list[JobOut]


class GalleryPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ImageOut]


class ImageMeta(BaseModel):
    image: ImageOut
    manifest: dict[str, Any]
    parameters: str = Field(description="the A1111-compatible parameters text")


class Info(BaseModel):
    version: str
    model: dict[str, Any]
    samplers: dict[str, str]
    schedules: list[str]
    limits: dict[str, int]
    queue: dict[str, int]
    worker_alive: bool
    adapters: dict[str, list[str]] = {}  # installed LoRA names and embedding tokens


class AdapterList(BaseModel):
    loras: list[str]  # names for <lora:NAME:SCALE> or the request's loras
    embeddings: list[str]  # tokens to write in a prompt


class Error(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "malformed id or request"},
    404: {"model": Error, "description": "no such job or image"},
}


def _safe(text: str) -> str:
    """A message that can always be sent as UTF-8 JSON (request text may hold lone surrogates)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(request: Request, exc: Exception, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"detail": "<one line>"}``; on the A1111 routes, A1111's error shape around the same line."""
    detail = _safe(detail)
    body = a1111.error_body(exc, status, detail) if request.url.path.startswith(a1111.PREFIX + "/") else {"detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def _one_line(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query"):
            loc = loc[1:]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts)


# --- the service's records as responses ------------------------------------------------------------


def image_out(im: ImageRecord) -> ImageOut:
    return ImageOut(
        id=im.id, job_id=im.job_id, index=im.idx, seed=im.seed, width=im.width, height=im.height,
        prompt=im.prompt, negative_prompt=im.negative_prompt, created=im.created,
        url=f"/api/gallery/{im.id}/image", metadata_url=f"/api/gallery/{im.id}",
    )


def job_out(view: JobView) -> JobOut:
    job = view.job
    return JobOut(
        id=job.id, state=job.state, created=job.created, started=job.started, finished=job.finished,
        attempts=job.attempts, error=job.error, position=view.position, step=view.step, total=view.total,
        preview_url=f"/api/jobs/{job.id}/preview" if view.preview is not None else None,
        images=[image_out(im) for im in view.images], request=view.request,
    )


def _job_or_404(srv: Service, job_id: str) -> Job:
    job = srv.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return job


def _image_or_404(srv: Service, image_id: str) -> ImageRecord:
    im = srv.image(image_id)
    if im is None:
        raise HTTPException(404, f"no image with id {image_id}")
    return im


# --- the app -----------------------------------------------------------------------------------------


def create_app(
    model: str | Path | ModelBundle | None,
    data_dir: str | Path,
    *,
    limits: Limits = Limits(),
    preview_every: int = 2,
    run_worker: bool = True,
    cors_origins: tuple[str, ...] = (),
    ui: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
    queue: str | RedisQueue | None = None,
) -> FastAPI:
    """The whole server as an ASGI app: ``model`` is a loaded bundle or a model folder (None: the installed
    default model). The data folder is locked at once (one server per folder); the worker starts and
    stops with the app's lifespan (``uvicorn`` runs it; so does ``with TestClient(app)``). ``queue``: a Redis
    URL (or ``RedisQueue``) to share the job queue with ``dreamlab worker``s on other machines."""
    if not isinstance(model, ModelBundle):
        from ..loading.model import load_model

        model = load_model(model, device=device, allow_pickle=allow_pickle)
    srv = Service(model, Path(data_dir), limits, preview_every, queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.start(run_worker)
        try:
            yield
        finally:
            srv.stop()

    app = FastAPI(
        title="dreamlab",
        version=__version__,
        description="Diffusion image generation: a persistent job queue, progress streaming and a gallery.",
        lifespan=lifespan,
        max_body_size=limits.max_body_bytes,
        docs_url=None,  # mount_docs serves them, with their assets
        redoc_url=None,
    )
    app.state.server = srv  # the Service (tests reach its store through it)
    app.openapi = lambda: _openapi(app, srv)  # type: ignore[method-assign]

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["content-type"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("loc", ("",))[0] == "path" for e in errors) else 422
        return _error(request, exc, status, _one_line(errors))

    @app.exception_handler(UnknownNameError)
    @app.exception_handler(InvalidRequestError)
    async def _bad_request(request: Request, exc: DreamlabError) -> JSONResponse:
        return _error(request, exc, 422, str(exc))

    @app.exception_handler(DreamlabError)
    async def _dreamlab(request: Request, exc: DreamlabError) -> JSONResponse:
        return _error(request, exc, 400, str(exc))

    @app.exception_handler(QueueUnavailableError)
    async def _unavailable(request: Request, exc: QueueUnavailableError) -> JSONResponse:
        return _error(request, exc, 503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(request, exc, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    # --- jobs ---

    @app.post("/api/jobs", status_code=202, response_model=JobOut, tags=["jobs"],
              responses={**ERRORS, 413: {"model": Error}, 422: {"model": Error}, 429: {"model": Error}})
    def submit_job(request: Annotated[GenerationRequest, Body()]) -> JobOut:
        """Queue a generation: text-to-image, img2img (``init_image`` + ``strength``) or inpainting
        (plus ``mask_image``). Images are base64 PNG/JPEG (a ``data:`` URL works too)."""
        try:
            job = srv.submit(request)
        except QueueFullError as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "5"}) from None
        return job_out(srv.view(job))

    @app.get("/api/jobs", response_model=JobList, tags=["jobs"], responses={422: {"model": Error}})
    def list_jobs(
        state: JobState | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> JobList:
        """Newest first."""
        return JobList(items=[job_out(view) for view in srv.jobs(state, limit, offset)])

    @app.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=ERRORS)
    def get_job(job_id: JobIdParam) -> JobOut:
        """State, queue position, progress (step / total), error, and the images once done."""
        return job_out(srv.view(_job_or_404(srv, job_id)))

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"],
              responses={**ERRORS, 409: {"model": Error}})
    def cancel_job(job_id: JobIdParam) -> JobOut:
        """A queued job is cancelled at once; a running one stops at its next step."""
        try:
            job = srv.cancel(job_id)
        except JobFinishedError as e:
            raise HTTPException(409, str(e)) from None
        if job is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return job_out(srv.view(job))

    @app.get("/api/jobs/{job_id}/preview", tags=["jobs"], responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def job_preview(job_id: JobIdParam) -> Response:
        """The latest low-resolution preview of the running job's x0 estimate."""
        _job_or_404(srv, job_id)
        preview = srv.preview(job_id)
        if preview is None:
            raise HTTPException(404, f"job {job_id} has no preview now")
        return Response(preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"], responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: JobIdParam, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``progress`` events (state, step, total, position and, when a new one is
        ready, ``preview`` as a PNG data URL), then one ``end`` event with the finished job."""
        _job_or_404(srv, job_id)
        return StreamingResponse(_events(srv, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # --- gallery ---

    @app.get("/api/gallery", response_model=GalleryPage, tags=["gallery"], responses={422: {"model": Error}})
    def gallery(
        q: Annotated[str, Query(max_length=200, description="substring of the prompt")] = "",
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> GalleryPage:
        """Every image, newest first; ``q`` searches the prompts."""
        total, items = srv.search_images(q, limit, offset)
        return GalleryPage(total=total, offset=offset, limit=limit, items=[image_out(im) for im in items])

    @app.get("/api/gallery/{image_id}", response_model=ImageMeta, tags=["gallery"], responses=ERRORS)
    def image_meta(image_id: ImageIdParam) -> ImageMeta:
        """The image's manifest (everything needed to replay it) and its A1111 parameters text."""
        im = _image_or_404(srv, image_id)
        return ImageMeta(image=image_out(im), manifest=im.manifest, parameters=srv.parameters(im))

    @app.get("/api/gallery/{image_id}/image", tags=["gallery"], responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def image_file(image_id: ImageIdParam) -> FileResponse:
        im = _image_or_404(srv, image_id)
        path = srv.image_path(im)
        if path is None:
            raise HTTPException(404, f"the file of image {image_id} is missing")
        return FileResponse(path, media_type="image/png", filename=f"dreamlab-{im.id}.png",
                            content_disposition_type="inline")

    @app.delete("/api/gallery/{image_id}", status_code=204, tags=["gallery"], responses=ERRORS)
    def delete_image(image_id: ImageIdParam) -> Response:
        if not srv.delete_image(image_id):
            raise HTTPException(404, f"no image with id {image_id}")
        return Response(status_code=204)

    @app.get("/api/inputs/{sha256}", tags=["gallery"], responses={**ERRORS, 200: {"content": {"image/*": {}}}})
    def input_file(sha256: Sha256Param) -> FileResponse:
        """An uploaded img2img source or mask, by the sha256 its images' manifests record: the file
        ``dreamlab replay --init-image / --mask`` needs."""
        path = srv.input_path(sha256)
        if path is None:
            raise HTTPException(404, f"no input with sha256 {sha256}")
        return FileResponse(path, filename=f"input-{path.name}")

    # --- server ---

    @app.get("/api/info", response_model=Info, tags=["server"])
    def info() -> Info:
        """Model, samplers, schedules, this server's limits and the queue's counts."""
        m = srv.model
        return Info(
            version=__version__,
            model={"name": m.name, "sample_size": m.sample_size, "factor": m.space.factor,
                   "image_channels": m.space.image_channels, "text": m.text_encoder is not None},
            samplers={name: ("stochastic" if name in STOCHASTIC else "deterministic") for name in sorted(SAMPLERS)},
            schedules=list(SPACINGS),
            limits=asdict(srv.limits),
            queue=srv.store.counts(),
            worker_alive=srv.worker.alive,
            adapters=adapter_list().model_dump(),
        )

    @app.get("/api/adapters", response_model=AdapterList, tags=["server"])
    def adapter_list() -> AdapterList:
        """The LoRAs and textual-inversion embeddings this server's model can use (docs/personalization.md)."""
        return AdapterList(loras=sorted(m_adapters().known("lora")), embeddings=sorted(m_adapters().known("embedding")))

    def m_adapters():
        return srv.model.adapters

    @app.get("/api/health", tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(a1111.a1111_router(srv))
    mount_docs(app)

    if ui:  # last: the UI is mounted at "/", so it gets only what no route above matched
        from .ui import mount_ui

        mount_ui(app, srv)

    return app


def _openapi(app: FastAPI, srv: Service) -> dict[str, Any]:
    """FastAPI's schema, with the requests' bounds narrowed to what this server and model accept
    (GenerationRequest's sampler names; the limits and the size multiple; for A1111's requests also the
    values that change nothing of the fields dreamlab lacks), so clients and fuzzers see the real contract."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        models = schema["components"]["schemas"]
        lim, f = srv.limits, srv.model.space.factor
        _narrow(models["GenerationRequest"]["properties"], "sampler", enum=sorted(SAMPLERS))
        _narrow(models["GenerationRequest"]["properties"], "batch", maximum=lim.max_batch)
        for name in ("GenerationRequest", "Txt2ImgRequest", "Img2ImgRequest"):
            props = models[name]["properties"]
            _narrow(props, "steps", minimum=1, maximum=lim.max_steps)
            _narrow(props, "prompt", maxLength=lim.max_prompt_chars)
            _narrow(props, "negative_prompt", maxLength=lim.max_prompt_chars)
            for side in ("width", "height"):
                _narrow(props, side, maximum=lim.max_side - lim.max_side % f, minimum=max(8, f), multipleOf=f)
        for name in ("Txt2ImgRequest", "Img2ImgRequest"):
            props = models[name]["properties"]
            for key in ("batch_size", "n_iter"):
                _narrow(props, key, minimum=1, maximum=lim.max_batch)
            _narrow(props, "cfg_scale", minimum=0, maximum=50)
            for key in ("denoising_strength", "eta"):
                _narrow(props, key, minimum=0, maximum=1)
            for no_op in NO_OPS:
                if no_op.field in props and no_op.values:
                    props[no_op.field] = {"title": props[no_op.field].get("title", no_op.field),
                                          "enum": list(no_op.values), "description": f"only these: {no_op.why}"}
        app.openapi_schema = schema
    return app.openapi_schema


def _narrow(props: dict[str, Any], name: str, **keys: Any) -> None:
    prop = props[name]
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number", "string"):
            branch.update(keys)


async def _events(srv: Service, job_id: str, request: Request) -> AsyncIterator[str]:
    """The job's updates (``Service.follow``, the loop the UI follows jobs with too) as SSE: a ``progress``
    event each, the preview as a data URL in the first event after it changed, the final one as ``end``."""
    async for update in srv.follow(job_id, stop=request.is_disconnected):
        out = job_out(update.view).model_dump(exclude={"request"})
        if update.new_preview is not None:
            out["preview"] = "data:image/png;base64," + base64.b64encode(update.new_preview).decode("ascii")
        yield f"event: {'end' if update.final else 'progress'}\ndata: {json.dumps(out)}\n\n"
