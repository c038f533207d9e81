"""The HTTP API: FastAPI app factory. Thin: it validates, queues and reports; the worker runs
``generate``. Every route is under ``/api``; the Gradio web UI (``ui.py``) is mounted at ``/``."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import io
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field

from .. import __version__
from ..core.samplers import SAMPLERS, STOCHASTIC
from ..core.schedules import SPACINGS
from ..errors import DreamlabError, InvalidRequestError, UnknownNameError
from ..generate import INPUT_IMAGES, GenerationRequest, image_bytes, image_sha256, open_image
from ..generate import check_request as check_for_model
from ..models.bundle import ModelBundle
from .gallery import Gallery
from .queue import TERMINAL, ImageRecord, Job, JobState, JobStore, QueueFullError
from .worker import Worker

log = logging.getLogger("dreamlab.server")

JOB_ID = r"^[0-9a-f]{32}$"
IMAGE_ID = r"^[0-9a-f]{32}-[0-9]{1,2}$"
SHA256 = r"^[0-9a-f]{64}$"
DB_NAME = "dreamlab.sqlite3"

JobIdParam = Annotated[str, PathParam(pattern=JOB_ID, description="32 hex digits")]
ImageIdParam = Annotated[str, PathParam(pattern=IMAGE_ID, description="'<job id>-<index>'")]
Sha256Param = Annotated[str, PathParam(pattern=SHA256, description="64 hex digits")]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (tighter than the engine's own bounds)."""

    max_steps: int = 150
    max_side: int = 1024  # pixels, width and height
    max_batch: int = 8
    max_prompt_chars: int = 1000
    max_body_bytes: int = 24 * 2**20  # whole request body, images included (base64)
    max_queue: int = 256  # jobs queued or running; more gets 429


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


class Error(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "malformed id or request"},
    404: {"model": Error, "description": "no such job or image"},
}


def _safe(text: str) -> str:
    """A message that can always be sent as UTF-8 JSON (request text may hold lone surrogates)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": _safe(detail)}, status_code=status, headers=headers)


def _one_line(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query"):
            loc = loc[1:]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts)


def _recorded(value: str | None, what: str) -> str | None:
    """How jobs and manifests show an input image: "sha256:" + the hash of its file bytes."""
    return None if value is None else image_sha256(value, what)


# --- request checks beyond the schema --------------------------------------------------------------


def _normalize_image(b64: str, what: str, max_side: int) -> tuple[bytes, str | None]:
    """The uploaded file's bytes (kept as they are, so the manifest's sha256 is ``sha256sum`` of the file)
    and the image format; rejects what is not a readable image of a sane size."""
    try:
        data = image_bytes(b64, what)
    except InvalidRequestError:
        raise InvalidRequestError(f"{what}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            size, fmt = probe.size, probe.format
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"{what}: not a readable image ({e})") from None
    if max(size) > 4 * max_side:
        raise InvalidRequestError(f"{what}: {size[0]}x{size[1]} is too large (at most {4 * max_side} pixels a side)")
    open_image(data, what)  # decodes it fully: a truncated file is refused now, not when the job runs
    return data, fmt


def check_request(req: GenerationRequest, model: ModelBundle, limits: Limits) -> None:
    """This server's limits, then the model's constraints (``generate.check_request``: size divisibility,
    eta support, a mask without an init image, seed overflow); every problem in one line."""
    problems = []
    if req.steps > limits.max_steps:
        problems.append(f"steps: at most {limits.max_steps} on this server")
    if req.batch > limits.max_batch:
        problems.append(f"batch: at most {limits.max_batch} on this server")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            problems.append(f"{name}: at most {limits.max_prompt_chars} characters on this server")
    for name, side in (("width", req.width or model.sample_size), ("height", req.height or model.sample_size)):
        if side > limits.max_side:
            problems.append(f"{name}: at most {limits.max_side} on this server")
    if not problems:
        try:
            size = check_for_model(model, req)  # the output size: a cascade's or an enlarged input's too
            problems += [f"{name}: the output would be {side}, at most {limits.max_side} on this server"
                         for name, side in zip(("width", "height"), size) if side > limits.max_side]
        except InvalidRequestError as e:
            problems.append(str(e))
    if problems:
        raise InvalidRequestError("; ".join(problems))


# --- the app -----------------------------------------------------------------------------------------


class Server:
    """State shared by the routes: the store, gallery, model and worker."""

    def __init__(self, model: ModelBundle, data_dir: Path, limits: Limits, preview_every: int):
        self.model, self.data_dir, self.limits = model, data_dir, limits
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(data_dir / ".lock", "w")
        except OSError as e:
            raise DreamlabError(f"cannot use {data_dir} for the server's data: {e.strerror or e}") from None
        try:  # one server per data folder: the queue has one worker (released when the process dies)
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise DreamlabError(f"another dreamlab server is using {data_dir}") from None
        self.store = JobStore(data_dir / DB_NAME, max_queue=limits.max_queue)
        self.gallery = Gallery(data_dir, self.store)
        self.worker = Worker(model, self.store, self.gallery, preview_every=preview_every)

    def start(self, run_worker: bool) -> None:
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.warning("requeued %d job(s) interrupted by the last shutdown", len(requeued))
        if run_worker:
            self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()
        self._lock_file.close()

    def submit(self, req: GenerationRequest) -> Job:
        check_request(req, self.model, self.limits)
        data = req.model_dump()
        if data["seed"] is None:  # fixed now, so a job that restarts makes the same images
            data["seed"] = secrets.randbelow(2**31)
        for key in INPUT_IMAGES:
            if data[key] is not None:
                raw, fmt = _normalize_image(data[key], key, self.limits.max_side)
                data[key] = base64.b64encode(raw).decode("ascii")  # canonical: no data: prefix, no line breaks
                self.gallery.record_input(raw, fmt)
        return self.store.submit(data)

    def image_out(self, im: ImageRecord) -> ImageOut:
        return ImageOut(
            id=im.id, job_id=im.job_id, index=im.idx, seed=im.seed, width=im.width, height=im.height,
            prompt=im.prompt, negative_prompt=im.negative_prompt, created=im.created,
            url=f"/api/gallery/{im.id}/image", metadata_url=f"/api/gallery/{im.id}",
        )

    def job_out(self, job: Job) -> JobOut:
        progress = self.store.progress(job.id) if job.state == "running" else None
        request = dict(job.request)
        for key in INPUT_IMAGES:
            if key in request:
                request[key] = _recorded(request[key], key)
        images = self.store.images_of(job.id) if job.state == "done" else []
        step = total = 0
        if progress is not None:
            step, total = progress.step, progress.total
        elif images:  # the steps actually walked (img2img walks fewer)
            step = total = len(images[0].manifest["sigmas"]) - 1
        return JobOut(
            id=job.id, state=job.state, created=job.created, started=job.started, finished=job.finished,
            attempts=job.attempts, error=job.error, position=self.store.position(job), step=step, total=total,
            preview_url=f"/api/jobs/{job.id}/preview" if progress is not None and progress.preview else None,
            images=[self.image_out(im) for im in images], request=request,
        )

    def job_or_404(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return job

    def image_or_404(self, image_id: str) -> ImageRecord:
        im = self.store.image(image_id)
        if im is None:
            raise HTTPException(404, f"no image with id {image_id}")
        return im


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
) -> FastAPI:
    """The whole server as an ASGI app: ``model`` is a loaded bundle or a model folder (None: the installed
    default model). The data folder is locked at once (one server per folder); the worker starts and
    stops with the app's lifespan (``uvicorn`` runs it; so does ``with TestClient(app)``)."""
    if not isinstance(model, ModelBundle):
        from ..loading.model import load_model

        model = load_model(model, device=device, allow_pickle=allow_pickle)
    srv = Server(model, Path(data_dir), limits, preview_every)

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
    )
    app.state.server = srv
    app.openapi = lambda: _openapi(app, srv)  # type: ignore[method-assign]

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["content-type"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("loc", ("",))[0] == "path" for e in errors) else 422
        return _error(status, _one_line(errors))

    @app.exception_handler(UnknownNameError)
    @app.exception_handler(InvalidRequestError)
    async def _bad_request(request: Request, exc: DreamlabError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(DreamlabError)
    async def _dreamlab(request: Request, exc: DreamlabError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

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
        return srv.job_out(job)

    @app.get("/api/jobs", response_model=JobList, tags=["jobs"], responses={422: {"model": Error}})
    def list_jobs(
        state: JobState | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> JobList:
        """Newest first."""
        return JobList(items=[srv.job_out(j) for j in srv.store.list_jobs(state, limit, offset)])

    @app.get("/api/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=ERRORS)
    def get_job(job_id: JobIdParam) -> JobOut:
        """State, queue position, progress (step / total), error, and the images once done."""
        return srv.job_out(srv.job_or_404(job_id))

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"],
              responses={**ERRORS, 409: {"model": Error}})
    def cancel_job(job_id: JobIdParam) -> JobOut:
        """A queued job is cancelled at once; a running one stops at its next step."""
        job = srv.job_or_404(job_id)
        if job.state in TERMINAL:
            raise HTTPException(409, f"job {job_id} is already {job.state}")
        job = srv.store.cancel(job_id)
        assert job is not None
        return srv.job_out(job)

    @app.get("/api/jobs/{job_id}/preview", tags=["jobs"], responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def job_preview(job_id: JobIdParam) -> Response:
        """The latest low-resolution preview of the running job's x0 estimate."""
        srv.job_or_404(job_id)
        progress = srv.store.progress(job_id)
        if progress is None or progress.preview is None:
            raise HTTPException(404, f"job {job_id} has no preview now")
        return Response(progress.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"], responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: JobIdParam, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``progress`` events (state, step, total, position and, when a new one is
        ready, ``preview`` as a PNG data URL), then one ``end`` event with the finished job."""
        srv.job_or_404(job_id)
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
        total, items = srv.store.search_images(q, limit, offset)
        return GalleryPage(total=total, offset=offset, limit=limit, items=[srv.image_out(im) for im in items])

    @app.get("/api/gallery/{image_id}", response_model=ImageMeta, tags=["gallery"], responses=ERRORS)
    def image_meta(image_id: ImageIdParam) -> ImageMeta:
        """The image's manifest (everything needed to replay it) and its A1111 parameters text."""
        from ..metadata import a1111_parameters

        im = srv.image_or_404(image_id)
        return ImageMeta(image=srv.image_out(im), manifest=im.manifest, parameters=a1111_parameters(im.manifest))

    @app.get("/api/gallery/{image_id}/image", tags=["gallery"], responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    def image_file(image_id: ImageIdParam) -> FileResponse:
        im = srv.image_or_404(image_id)
        path = srv.gallery.image_path(im)
        if path is None:
            raise HTTPException(404, f"the file of image {image_id} is missing")
        return FileResponse(path, media_type="image/png", filename=f"dreamlab-{im.id}.png",
                            content_disposition_type="inline")

    @app.delete("/api/gallery/{image_id}", status_code=204, tags=["gallery"], responses=ERRORS)
    def delete_image(image_id: ImageIdParam) -> Response:
        if not srv.gallery.delete(image_id):
            raise HTTPException(404, f"no image with id {image_id}")
        return Response(status_code=204)

    @app.get("/api/inputs/{sha256}", tags=["gallery"], responses={**ERRORS, 200: {"content": {"image/*": {}}}})
    def input_file(sha256: Sha256Param) -> FileResponse:
        """An uploaded img2img source or mask, by the sha256 its images' manifests record: the file
        ``dreamlab replay --init-image / --mask`` needs."""
        path = srv.gallery.input_path(sha256)
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
        )

    @app.get("/api/health", tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    if ui:  # last: the UI is mounted at "/", so it gets only what no route above matched
        from .ui import mount_ui

        mount_ui(app, srv)

    return app


def _openapi(app: FastAPI, srv: Server) -> dict[str, Any]:
    """FastAPI's schema, with GenerationRequest's bounds narrowed to what this server and model accept
    (sampler names, limits, the size multiple), so clients and fuzzers see the real contract."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        props = schema["components"]["schemas"]["GenerationRequest"]["properties"]

        def narrow(name: str, **keys: Any) -> None:
            prop = props[name]
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") in ("integer", "string"):
                    branch.update(keys)

        lim, f = srv.limits, srv.model.space.factor
        narrow("sampler", enum=sorted(SAMPLERS))
        narrow("steps", maximum=lim.max_steps)
        narrow("batch", maximum=lim.max_batch)
        narrow("prompt", maxLength=lim.max_prompt_chars)
        narrow("negative_prompt", maxLength=lim.max_prompt_chars)
        for side in ("width", "height"):
            narrow(side, maximum=lim.max_side - lim.max_side % f, minimum=max(8, f), multipleOf=f)
        app.openapi_schema = schema
    return app.openapi_schema


async def _events(srv: Server, job_id: str, request: Request, max_seconds: float = 6 * 3600) -> AsyncIterator[str]:
    """Checks twenty times a second, but reads the job only after the store changed (a job changed state, or
    this job made progress), so idle streams cost next to nothing."""
    seen: tuple | None = None
    last: tuple | None = None
    sent_preview: bytes | None = None
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        progress = srv.store.progress(job_id)
        now = (srv.store.version, progress.version if progress else -1)
        job = srv.store.get(job_id, with_request=False) if now != seen else None
        seen = now
        if job is not None and (key := (job.state, now[1], srv.store.position(job))) != last:
            last = key
            out = srv.job_out(job).model_dump(exclude={"request"})
            if progress is not None and progress.preview is not None and progress.preview is not sent_preview:
                sent_preview = progress.preview
                out["preview"] = "data:image/png;base64," + base64.b64encode(progress.preview).decode("ascii")
            event = "end" if job.state in TERMINAL else "progress"
            yield f"event: {event}\ndata: {json.dumps(out)}\n\n"
            if event == "end":
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)
