"""The web UI, the server's Gradio face: a Blocks app mounted at ``/`` of the server's FastAPI app
(``gr.mount_gradio_app``).

Thin, like the HTTP face (``app.py``), and calling the same service (``service.py``; this module never
imports ``app``): it builds a ``GenerationRequest``, submits it through ``Service.submit`` (the same
validation, limits and persistent job queue as ``POST /api/jobs``) and then follows the job with
``Service.follow`` (the loop behind ``GET /api/jobs/{id}/events``), yielding its progress, previews and
images. Cancel and the gallery go through the service too. No sampling logic lives here.

Offline by construction: analytics and Gradio's version check are off (``GRADIO_ANALYTICS_ENABLED=False``,
set before Gradio is imported), there is no share link, server-side rendering is off, and the theme uses
the system's fonts, so the page asks nothing of any host but this server.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
from PIL import Image
from pydantic import ValidationError

from ..core.samplers import SAMPLERS
from ..core.schedules import SPACINGS
from ..errors import DreamlabError, InvalidRequestError
from ..generate import GenerationRequest, format_validation_error, sr_factor
from .queue import ImageRecord, QueueFullError, QueueUnavailableError
from .service import JobFinishedError, Service
from .ui_adapters import adapter_picker
from .ui_collage import RESIZE_JS, collage_editor, collage_spec

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio: no telemetry, no version check
os.environ.setdefault("GRADIO_SSR_MODE", "False")  # no Node.js server

import gradio as gr  # noqa: E402  (after the environment above)

if TYPE_CHECKING:
    from fastapi import FastAPI

CONTROL_NOTE = "Text to image, image to image and inpainting follow the control image's structure (a map, or a picture with the box ticked)."
CONTROL_NONE = "No ControlNet for this model is installed: train one with `dreamlab train controlnet`."
GALLERY_PAGE = 48  # images the gallery shows (newest first)
POLL_SECONDS = 0.1  # how often a running generation looks for news of its job (a browser needs no more)

CSS = """
#preview img, #results img, #gallery img { image-rendering: pixelated; }
#progress progress { width: 100%; height: 0.9rem; }
#progress .status { font-variant-numeric: tabular-nums; }
#control-note { opacity: 0.7; }
"""


# --- what the handlers do, without Gradio (unit-tested directly) ---------------------------------------


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def editor_inputs(value: dict[str, Any] | None) -> tuple[Image.Image, Image.Image]:
    """The ImageEditor's value -> (source image, mask). The source is the editor's background; the mask is
    the alpha of the painted layer(s), hard-edged: white (255) wherever anything was painted = repaint,
    black elsewhere = keep."""
    background = (value or {}).get("background")
    if background is None:
        raise InvalidRequestError("inpainting: upload a source image first")
    source = background if isinstance(background, Image.Image) else Image.fromarray(np.asarray(background))
    painted = np.zeros((source.height, source.width), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        if layer is None:
            continue
        im = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        im = im.convert("RGBA")
        if im.size != source.size:
            im = im.resize(source.size, Image.NEAREST)
        painted |= np.asarray(im)[..., 3] > 0
    if not painted.any():
        raise InvalidRequestError("inpainting: paint the region to repaint on the source image")
    return source, Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def build_request(
    mode: str,
    prompt: str,
    negative_prompt: str,
    sampler: str,
    schedule: str,
    steps: float,
    cfg_scale: float,
    seed: float | None,
    batch: float,
    width: float,
    height: float,
    init_path: str | None = None,
    img2img_strength: float = 0.75,
    editor: dict[str, Any] | None = None,
    inpaint_strength: float = 1.0,
    lowres_path: str | None = None,
    noise_level: float | None = None,
    edit_target: str = "",
    edit_image_path: str | None = None,
    edit_blend: str = "",
    edit_reweight: str = "",
    edit_auto_mask: bool = False,
    control_path: str | None = None,
    control_condition: str | None = None,
    control_scale: float = 1.0,
    control_preprocess: bool = False,
    collage_layout: str = "",
    collage_state: str | None = None,
    instruct_path: str | None = None,
    image_cfg: float = 1.5,
) -> GenerationRequest:
    """The form's values -> a validated GenerationRequest (the schema's checks; the server's come at submit).
    Seed blank or negative: random. img2img and upscale send the uploaded file's bytes as they are; upscale
    leaves width and height out, so the output is the image enlarged by the model's factor."""
    fields: dict[str, Any] = {
        "prompt": prompt or "",
        "negative_prompt": negative_prompt or "",
        "sampler": sampler,
        "schedule": schedule,
        "steps": int(steps),
        "cfg_scale": float(cfg_scale),
        "seed": None if seed is None or seed < 0 else int(seed),
        "batch": int(batch),
        "width": int(width),
        "height": int(height),
    }
    if mode == "img2img":
        if not init_path:
            raise InvalidRequestError("image to image: upload a source image first")
        fields["init_image"] = base64.b64encode(Path(init_path).read_bytes()).decode("ascii")
        fields["strength"] = float(img2img_strength)
    elif mode == "inpaint":
        source, mask = editor_inputs(editor)
        fields["init_image"], fields["mask_image"] = png_b64(source), png_b64(mask)
        fields["strength"] = float(inpaint_strength)
    elif mode == "upscale":
        if not lowres_path:
            raise InvalidRequestError("upscale: upload the image to enlarge first")
        fields["lowres_image"] = base64.b64encode(Path(lowres_path).read_bytes()).decode("ascii")
        fields["noise_level"] = None if noise_level is None else int(noise_level)
        del fields["width"], fields["height"]
    elif mode == "edit":
        if not (edit_target or "").strip():
            raise InvalidRequestError("edit: write the edited prompt")
        fields["edit"] = {"target": edit_target, "local_blend": (edit_blend or "").split(),
                          "reweight": _pairs(edit_reweight), "auto_mask": bool(edit_auto_mask)}
        if edit_image_path:  # a picture: inverted first, so sampled deterministically
            fields["init_image"] = base64.b64encode(Path(edit_image_path).read_bytes()).decode("ascii")
            fields["sampler"] = "ddim"
    elif mode == "collage":
        fields["collage"] = collage_spec(collage_layout, collage_state)
    elif mode == "instruct":
        if not instruct_path:
            raise InvalidRequestError("instruct: upload the image to edit first")
        if not (prompt or "").strip():
            raise InvalidRequestError("instruct: write the instruction in the prompt, e.g. \"make it green\"")
        fields["source_image"] = base64.b64encode(Path(instruct_path).read_bytes()).decode("ascii")
        fields["image_cfg_scale"] = float(image_cfg)
    elif mode != "txt2img":
        raise InvalidRequestError(f"unknown mode {mode!r}")
    if control_path and mode in ("txt2img", "img2img", "inpaint"):
        if not control_condition:
            raise InvalidRequestError("control: this model has no ControlNet installed")
        fields["controls"] = [{"condition": control_condition, "image": base64.b64encode(Path(control_path).read_bytes()).decode("ascii"),
                               "scale": float(control_scale), "preprocess": bool(control_preprocess)}]
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as e:
        raise InvalidRequestError(format_validation_error(e)) from None


def _pairs(text: str) -> dict[str, float]:
    """"red=2, apple=1.5" -> {"red": 2.0, "apple": 1.5}."""
    out = {}
    for item in (text or "").replace(",", " ").split():
        word, sep, value = item.partition("=")
        try:
            out[word] = float(value)
        except ValueError:
            sep = ""
        if not sep or not word:
            raise InvalidRequestError(f"reweight: write WORD=SCALE, e.g. red=2 (got {item!r})")
    return out


def progress_html(state: str, step: int = 0, total: int = 0, text: str = "") -> str:
    """A progress bar and one status line (``state`` is the job's, or ``idle`` / ``error``)."""
    if total:
        bar = f'<progress value="{step}" max="{total}"></progress>'
    else:  # indeterminate while waiting, none at rest
        bar = "<progress></progress>" if state in ("queued", "running") else ""
    return (f'<div class="dl-progress" data-state="{state}" data-step="{step}" data-total="{total}">{bar}'
            f'<div class="status">{html.escape(text)}</div></div>')


def _caption(im: ImageRecord) -> str:
    prompt = im.prompt if len(im.prompt) <= 60 else im.prompt[:59] + "…"
    return f"{prompt} · {im.seed}"


# --- the Blocks app ----------------------------------------------------------------------------------


def build_ui(srv: Service) -> gr.Blocks:
    model, limits = srv.model, srv.limits
    f = model.space.factor
    side_max = max(f, limits.max_side - limits.max_side % f)
    side_min = -(-max(8, f) // f) * f  # the smallest multiple of f that is at least 8
    default_side = min(max(model.sample_size, side_min), side_max)
    brush_size = max(1, model.sample_size // 16)  # radius in image pixels ("auto" is huge on small images)

    def gallery_items(query: str) -> tuple[list[tuple[str, str]], list[str]]:
        _, records = srv.search_images((query or "")[:200], GALLERY_PAGE, 0)
        items, ids = [], []
        for im in records:
            path = srv.image_path(im)
            if path is not None:
                items.append((str(path), _caption(im)))
                ids.append(im.id)
        return items, ids

    async def run(mode, prompt, negative, sampler, schedule, steps, cfg, seed, batch, width, height,
                  init_path, img2img_strength, editor, inpaint_strength, lowres_path, noise_level,
                  edit_target, edit_image, edit_blend, edit_reweight, edit_auto_mask,
                  control_path, control_condition, control_scale, control_preprocess, collage_layout,
                  collage_state, instruct_path, image_cfg) -> AsyncIterator[tuple]:
        """Submit like POST /api/jobs, then follow the job: (progress, preview, results, job id)."""
        try:
            req = build_request(mode, prompt, negative, sampler, schedule, steps, cfg, seed, batch, width, height,
                                init_path, img2img_strength, editor, inpaint_strength, lowres_path, noise_level,
                                edit_target, edit_image, edit_blend, edit_reweight, edit_auto_mask,
                                control_path, control_condition, control_scale, control_preprocess, collage_layout,
                                collage_state, instruct_path, image_cfg)
            job = await asyncio.to_thread(srv.submit, req)
        except (DreamlabError, QueueFullError, QueueUnavailableError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        first = True  # the first update also clears the last run's preview and results
        view, final = None, False
        async for update in srv.follow(job.id, poll=POLL_SECONDS):
            view, final = update.view, update.final
            if final:
                continue  # the last update (follow ends after it): shown below
            preview: Any = None if first else gr.skip()
            if view.total == 0:
                text = f"queued: {view.position} job(s) ahead" if view.state == "queued" else "starting"
                bar = progress_html(view.state, text=text)
            else:
                bar = progress_html("running", view.step, view.total, f"step {view.step} / {view.total}")
                if update.new_preview is not None:
                    preview = Image.open(io.BytesIO(update.new_preview))
            yield bar, preview, [] if first else gr.skip(), job.id
            first = False
        if view is None or not final:  # the follower gave up (the job goes on)
            state = view.state if view is not None else job.state
            yield progress_html(state, text=f"{state}: stopped following it (job {job.id})"), gr.skip(), gr.skip(), None
        elif view.state == "done":
            seeds = ", ".join(str(im.seed) for im in view.images)
            results = [(str(p), _caption(im)) for im in view.images if (p := srv.image_path(im)) is not None]
            n = len(view.images)
            yield (progress_html("done", 1, 1, f"done: {n} image{'s' if n != 1 else ''}, seed {seeds}"),
                   None, results, None)
        else:
            text = f"{view.state}: {view.job.error}" if view.job.error else view.state
            yield progress_html(view.state, text=text), None, gr.skip(), None

    def cancel(job_id: str | None) -> str:
        try:
            job = srv.cancel(job_id) if job_id else None
        except JobFinishedError:
            job = None
        return progress_html(job.state, text="cancelling…") if job is not None else gr.skip()

    def refresh(query: str):
        items, ids = gallery_items(query)
        return items, ids, None

    def select(ids: list[str], evt: gr.SelectData):
        if not ids or evt.index is None or evt.index >= len(ids):
            return None, ""
        im = srv.image(ids[evt.index])
        if im is None:
            return None, "(deleted)"
        return im.id, srv.parameters(im)

    def delete(image_id: str | None, query: str):
        if image_id:
            srv.delete_image(image_id)
        items, ids = gallery_items(query)
        return items, ids, None, ""

    with gr.Blocks(title="dreamlab", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        is_sr = model.sr is not None  # a super-resolution model only enlarges images: its own tab, no others
        mode = gr.State("upscale" if is_sr else "txt2img")
        job_id = gr.State(None)
        gallery_ids = gr.State([])
        selected = gr.State(None)
        gr.Markdown(f"## dreamlab\nModel **{html.escape(model.name)}** · {model.sample_size} px · "
                    f"HTTP API under `/api` ([schema](/openapi.json))", elem_id="model-name")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=limits.max_prompt_chars, elem_id="prompt",
                                    placeholder='red apple    (compose with AND: "grinning face AND twitter style :0.5")')
                negative = gr.Textbox(label="Negative prompt", max_length=limits.max_prompt_chars, elem_id="negative")
                adapter_picker(gr, model, prompt)
                with gr.Tabs(elem_id="modes", selected="upscale" if is_sr else "txt2img"):
                    with gr.Tab("Upscale", id="upscale", elem_id="tab-upscale", visible=is_sr) as tab_up:
                        lowres = gr.Image(label="Image to enlarge", type="filepath", image_mode=None,
                                          sources=["upload", "clipboard"], height=280, elem_id="lowres-image")
                        gr.Markdown(f"Enlarged {sr_factor(model) if is_sr else 1}x, guided by the prompt; Width and Height are ignored.")
                        noise_level = gr.Slider(0, 999, value=model.sr.noise_level if is_sr else 0, step=1,
                                                label="Noise level (augmentation of the input: higher repairs more, keeps less)",
                                                elem_id="noise-level")
                    with gr.Tab("Text to image", id="txt2img", elem_id="tab-txt2img", visible=not is_sr) as tab_txt:
                        gr.Markdown("From noise, guided by the prompt.")
                    with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img", visible=not is_sr) as tab_img:
                        init = gr.Image(label="Source image", type="filepath", image_mode=None,
                                        sources=["upload", "clipboard"], height=280, elem_id="init-image")
                        img2img_strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Strength (share of the schedule re-run)",
                                                     elem_id="img2img-strength")
                    with gr.Tab("Inpainting", id="inpaint", elem_id="tab-inpaint", visible=not is_sr) as tab_inp:
                        editor = gr.ImageEditor(
                            label="Source image: paint the region to repaint", type="pil", image_mode="RGBA",
                            sources=["upload", "clipboard"], layers=False, transforms=(),
                            brush=gr.Brush(colors=[("#ff00ff", 0.6)], color_mode="fixed", default_size=brush_size),
                            eraser=gr.Eraser(), height=360, elem_id="mask-editor",
                        )
                        inpaint_strength = gr.Slider(0, 1, value=1.0, step=0.01, label="Strength", elem_id="inpaint-strength")
                    with gr.Tab("Edit by prompt", id="edit", elem_id="tab-edit", visible=not is_sr) as tab_edit:
                        gr.Markdown("The prompt above is the source; write the edit (prompt-to-prompt). Without a "
                                    "picture the source is generated beside the edit; a picture is inverted first.")
                        edit_target = gr.Textbox(label="Edited prompt", max_length=limits.max_prompt_chars, elem_id="edit-target")
                        edit_image = gr.Image(label="Picture to edit (optional)", type="filepath", image_mode=None,
                                              sources=["upload", "clipboard"], height=200, elem_id="edit-image")
                        with gr.Row():
                            edit_blend = gr.Textbox(label="Local blend words (space separated)", elem_id="edit-blend")
                            edit_reweight = gr.Textbox(label="Reweight (word=scale, ...)", elem_id="edit-reweight")
                        edit_auto_mask = gr.Checkbox(label="Automatic mask (DiffEdit), then inpaint", elem_id="edit-auto-mask")
                        gr.Markdown("Results: the edit, the source, and the edit's attention maps per token.")
                    with gr.Tab("Collage", id="collage", elem_id="tab-collage", visible=not is_sr) as tab_collage:
                        gr.Markdown("Layers, bottom first: a prompt and a box each (drag to move, a corner to resize), "
                                    "optionally an image; the prompt above is the scene's. Results: the harmonised scene, "
                                    "the layers restacked, each layer (RGBA).")
                        collage_state, collage_layout = collage_editor(model.sample_size, default_side, default_side)
                    editor_model = model if "source_image" in model.inputs else model.instruction_model()
                    with gr.Tab("Instruct", id="instruct", elem_id="tab-instruct",
                                visible=not is_sr and editor_model is not None) as tab_instruct:
                        gr.Markdown("Edit a picture by an instruction (InstructPix2Pix): write it in the prompt, "
                                    "e.g. *make it green*, *turn the cat into a dog*. Image guidance keeps the "
                                    "picture; the guidance scale below follows the instruction."
                                    + (f" Model: **{html.escape(editor_model.name)}**." if editor_model is not None else ""))
                        instruct_image = gr.Image(label="Picture to edit", type="filepath", image_mode=None,
                                                  sources=["upload", "clipboard"], height=220, elem_id="instruct-image")
                        image_cfg = gr.Slider(0, 5, value=editor_model.defaults.image_cfg_scale if editor_model else 1.5,
                                              step=0.05, label="Image guidance s_I", elem_id="image-cfg")
                conditions = sorted(model.controlnets())
                with gr.Group(elem_id="control"):
                    control_path = gr.Image(label="Control image (ControlNet)" if conditions else "Control image (no ControlNet installed)",
                                            type="filepath", image_mode=None, sources=["upload", "clipboard"], height=160,
                                            interactive=bool(conditions), elem_id="control-image")
                    with gr.Row():
                        control_condition = gr.Dropdown(conditions, value=conditions[0] if conditions else None,
                                                        label="Condition", interactive=bool(conditions), elem_id="control-condition")
                        control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale", elem_id="control-scale")
                        control_preprocess = gr.Checkbox(label="Compute the map from a picture", elem_id="control-preprocess")
                    gr.Markdown(CONTROL_NOTE if conditions else CONTROL_NONE, elem_id="control-note", padding=True)
                with gr.Row():
                    sampler = gr.Dropdown(sorted(SAMPLERS), value="dpmpp_2m", label="Sampler", elem_id="sampler")
                    schedule = gr.Dropdown(list(SPACINGS), value="karras", label="Schedule", elem_id="schedule")
                with gr.Row():
                    steps = gr.Slider(1, limits.max_steps, value=min(30, limits.max_steps), step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(0, 50, value=5.0, step=0.5, label="Guidance scale", elem_id="cfg")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed (blank or -1: random)", elem_id="seed")
                    batch = gr.Slider(1, limits.max_batch, value=1, step=1, label="Batch", elem_id="batch")
                with gr.Row():
                    width = gr.Slider(side_min, side_max, value=default_side, step=f, label="Width", elem_id="width")
                    height = gr.Slider(side_min, side_max, value=default_side, step=f, label="Height", elem_id="height")
            with gr.Column(scale=2):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                progress = gr.HTML(progress_html("idle", text="ready"), elem_id="progress")
                preview = gr.Image(label="Preview (x0 estimate)", type="pil", format="png", interactive=False,
                                   height=200, elem_id="preview")
                results = gr.Gallery(label="Results", columns=4, height=320, fit_columns=False, interactive=False,
                                     buttons=["download", "fullscreen"], elem_id="results")
        gr.Markdown("### Gallery")
        with gr.Row():
            search = gr.Textbox(label="Search prompts", max_length=200, scale=4, elem_id="search")
            refresh_btn = gr.Button("Refresh", scale=1, elem_id="refresh")
        gallery = gr.Gallery(label="Gallery (newest first)", columns=8, height=360, fit_columns=False, interactive=False,
                             buttons=["download", "fullscreen"], elem_id="gallery")
        with gr.Row():
            params = gr.Textbox(label="Selected image: parameters", lines=3, interactive=False, scale=4, elem_id="params")
            delete_btn = gr.Button("Delete selected", variant="stop", scale=1, elem_id="delete")

        for tab, name in ((tab_txt, "txt2img"), (tab_img, "img2img"), (tab_inp, "inpaint"), (tab_up, "upscale"),
                          (tab_edit, "edit"), (tab_collage, "collage"), (tab_instruct, "instruct")):
            tab.select(lambda name=name: name, None, mode, queue=False, show_progress="hidden", api_visibility="private")
        inputs = [mode, prompt, negative, sampler, schedule, steps, cfg, seed, batch, width, height,
                  init, img2img_strength, editor, inpaint_strength, lowres, noise_level,
                  edit_target, edit_image, edit_blend, edit_reweight, edit_auto_mask,
                  control_path, control_condition, control_scale, control_preprocess, collage_layout,
                  collage_state, instruct_image, image_cfg]
        for size in (width, height):
            size.change(None, [collage_state, width, height], collage_state, js=RESIZE_JS, show_progress="hidden",
                        api_visibility="private")
        gen = generate.click(run, inputs, [progress, preview, results, job_id], show_progress="hidden",
                             concurrency_limit=None, api_name="generate")
        gen.then(refresh, search, [gallery, gallery_ids, selected], show_progress="hidden", api_visibility="private")
        stop.click(cancel, job_id, progress, queue=False, show_progress="hidden", api_visibility="private")
        for trigger in (search.submit, refresh_btn.click, demo.load):
            trigger(refresh, search, [gallery, gallery_ids, selected], show_progress="hidden", api_visibility="private")
        gallery.select(select, gallery_ids, [selected, params], show_progress="hidden", api_visibility="private")
        delete_btn.click(delete, [selected, search], [gallery, gallery_ids, selected, params], show_progress="hidden",
                         api_visibility="private")
    return demo


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts (the default theme would fetch Google Fonts)."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def mount_ui(app: FastAPI, srv: Service, path: str = "/") -> FastAPI:
    """Mount the UI on ``app`` (after every API route, so ``/api`` and ``/openapi.json`` keep theirs)."""
    return gr.mount_gradio_app(
        app, build_ui(srv), path=path, theme=theme(), css=CSS, footer_links=[], run_history=False,
        allowed_paths=[str(srv.gallery.images_dir.resolve())], max_file_size=srv.limits.max_body_bytes,
        ssr_mode=False, mcp_server=False, show_error=True,
    )
