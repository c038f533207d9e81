"""The web UI's collage editor (the Collage tab of ``ui.py``): layers as boxes on a canvas drawn at the
request's width and height; add, move, resize, reorder, delete, a prompt and a strength each, and an
optional uploaded image shown inside its box.

Two Gradio components, kept in step in the browser (``collage_editor.js``), never through a round trip to
Python, so what Generate sends is what is on screen even when it is clicked right after an edit:

- the **layout textbox**: the ``collage`` field of ``POST /api/jobs`` as JSON, one layer a line, bottom
  layer first, except that a layer's ``image`` is the name of an image uploaded in the editor (as in a
  layout file, where it is a file's path). Typing here redraws the canvas; dragging there rewrites this.
- the **editor** (a ``gr.HTML`` whose ``js_on_load`` is the script): its value is JSON holding the canvas's
  size (set from the Width and Height sliders, by ``RESIZE_JS``) and the uploaded images by name (base64,
  as the API takes them).

Generation reads both: :func:`collage_spec` puts the uploads in place of their names, and the request's
validation (one line naming each bad field) does the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from ..compose.collage import MAX_LAYERS
from ..errors import InvalidRequestError

LAYOUT_ID = "collage-layout"  # the layout textbox's elem_id, which the script looks up


@dataclass
class EditorState:
    """The editor's value: the canvas's size and the images uploaded in it, by name (base64)."""

    width: int
    height: int
    images: dict[str, str] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps({"width": self.width, "height": self.height, "images": self.images})

    @classmethod
    def loads(cls, value: str | None) -> EditorState:
        try:
            v = json.loads(value or "")
            return cls(int(v["width"]), int(v["height"]), {str(k): str(b) for k, b in (v.get("images") or {}).items()})
        except (ValueError, TypeError, KeyError, AttributeError):
            raise InvalidRequestError("collage: the editor's state is unreadable; reload the page") from None


def layout_text(spec: dict[str, Any]) -> str:
    """A layout as the textbox shows it: one layer a line, the layout's other fields after the list."""
    lines = [json.dumps(layer) for layer in spec.get("layers", [])]
    layers = "[\n  " + ",\n  ".join(lines) + "\n]" if lines else "[]"
    rest = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in spec.items() if k != "layers")
    return '{"layers": ' + layers + rest + "}"


def default_layout(side: int) -> dict[str, Any]:
    """Two layers side by side on a canvas of the model's size."""
    return {"layers": [{"prompt": "red apple", "box": [0, side // 4, side // 2, side * 3 // 4], "strength": 0.25},
                       {"prompt": "pizza", "box": [side // 2, side // 4, side, side * 3 // 4], "strength": 0.25}]}


def collage_spec(text: str | None, editor_value: str | None) -> dict[str, Any]:
    """The layout textbox and the editor's value -> the request's ``collage`` (images as base64). The
    layers' fields are left to the request's validation; only what it cannot see is checked here."""
    try:
        spec = json.loads(text or "")
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"collage layout: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        raise InvalidRequestError('collage layout: write {"layers": [{"prompt": "...", "box": [x0, y0, x1, y1]}, ...]}')
    images = EditorState.loads(editor_value).images if editor_value else {}  # the Gradio API may leave it out
    layers = []
    for k, layer in enumerate(spec["layers"]):
        name = layer.get("image") if isinstance(layer, dict) else None
        if isinstance(name, str):
            if name not in images:
                raise InvalidRequestError(f"collage.layers.{k}.image: {name!r} is not an image uploaded in the editor")
            layer = {**layer, "image": images[name]}
        layers.append(layer)
    return {**spec, "layers": layers}


# The Width and Height sliders -> the editor's canvas size (its layers stay where they are), in the browser:
# a round trip per slider through Python could come back out of order and leave the other size showing.
RESIZE_JS = "(state, width, height) => JSON.stringify({...JSON.parse(state), width, height})"


def _asset(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def collage_editor(side: int, width: int, height: int):
    """The editor and the layout textbox, in the open Blocks context (the Collage tab): (editor, layout)."""
    import gradio as gr

    editor = gr.HTML(EditorState(width, height).dumps(), html_template='<div class="dl-collage"></div>',
                     css_template=_asset("collage_editor.css"), js_on_load=_asset("collage_editor.js"),
                     apply_default_css=False, elem_id="collage-editor", layout_id=LAYOUT_ID, max_layers=MAX_LAYERS)
    layout = gr.Textbox(layout_text(default_layout(side)), label="Layout (the API's collage field; images by upload name)",
                        lines=4, max_lines=14, autoscroll=False, elem_id=LAYOUT_ID, buttons=["copy"])
    return editor, layout
