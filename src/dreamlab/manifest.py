"""The manifest: the typed record every output image carries, from which ``dreamlab replay`` regenerates it.

One schema, read by the PNG metadata (``metadata``), replay, the gallery and the server. Its JSON form
(``dump()``) is what a PNG's ``dreamlab`` text chunk holds; manifests written before this record existed
parse as they are (unknown keys are kept, so a newer manifest survives an older reader's round trip).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    source: str = ""  # the folder it was loaded from
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256
    prediction: str | None = None  # eps / v / x0 as sampled (a single-file SD 2.x checkpoint does not say it)


class StageRecord(BaseModel):
    """One stage of a cascade: the size it made, the sigmas it walked, its noise level (SR)."""

    model_config = ConfigDict(extra="allow")
    stage: str
    width: int
    height: int
    sigmas: list[float]
    noise_level: int | None = None


class AdapterRecord(BaseModel):
    """A network or file applied on top of the model: a ControlNet, a LoRA, a textual-inversion embedding."""

    model_config = ConfigDict(extra="allow")
    kind: str  # "controlnet", "lora", "embedding"
    name: str  # its condition, its name, or its token
    source: str = ""  # the folder or file it was loaded from
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256
    scale: float | None = None  # a LoRA's


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    dreamlab_version: str
    torch_version: str
    platform: str
    model: ModelRecord
    sampler: str
    sigmas: list[float]  # the grid the (first) stage actually walked
    # the request of this one image (seed fixed, batch 1), input images recorded by the sha256 of their bytes
    request: dict[str, Any]
    seed: int
    batch_index: int = 0
    width: int
    height: int
    noise_level: int | None = None  # a super-resolution model's augmentation level
    stages: list[StageRecord] | None = None  # a cascade's stages
    adapters: list[AdapterRecord] | None = None  # ControlNets and other additions, with their files' hashes
    artifact: str | None = None  # set on what is not the image itself: "attention" (an edit's attention maps)

    @property
    def prompt(self) -> str:
        return str(self.request.get("prompt", ""))

    @property
    def negative_prompt(self) -> str:
        return str(self.request.get("negative_prompt", ""))

    def dump(self) -> dict[str, Any]:
        """The JSON form: fields that are unset stay out, as they always have."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def load(cls, data: dict[str, Any]) -> "Manifest":
        return cls.model_validate(data)
