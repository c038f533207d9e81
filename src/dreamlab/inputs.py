"""The request fields that carry an image, listed once: the CLI's options, replay's and the UI's derive
from these. Imports nothing heavy, so that ``dreamlab --help`` stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputImage:
    """A request field that carries an image; the CLI's options, replay's and the UI's derive from these."""

    field: str  # the GenerationRequest field (base64 of the file's bytes)
    flag: str  # the option of `dreamlab generate` and `dreamlab replay` that gives the file
    what: str  # how messages name it
    help: str
    made: str  # "this image was <made> ..."

    @property
    def dest(self) -> str:
        """The argparse destination of its option ("--mask" -> "mask")."""
        return self.flag.lstrip("-").replace("-", "_")


INPUTS: tuple[InputImage, ...] = (
    InputImage("init_image", "--init-image", "init image", "img2img / inpainting source image file",
               "made from an init image"),
    InputImage("mask_image", "--mask", "inpainting mask", "inpainting mask image file: white = repaint",
               "made with a mask"),
    InputImage("lowres_image", "--lowres-image", "low-res input",
               "super-resolution models: the image file to enlarge (see `dreamlab upscale`)", "enlarged from a low-res input"),
    InputImage("source_image", "--source-image", "source image",
               "instruction-editing models: the image file the prompt edits (see `dreamlab instruct`)",
               "edited from a source image by an instruction"),
)
INPUT_IMAGES = tuple(i.field for i in INPUTS)  # request fields that carry an image
