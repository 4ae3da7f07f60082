"""One batch of model work and its answers: typed, versioned, JSON-safe.

Every analysis builds an :class:`InferenceRequest` (:func:`model.analyze.build_request`), has it answered by a
runner (the model in this process: :func:`model.analyze.run_batch`; the gpu queue of the pipeline; the model a
gateway holds) and assembles the result from the :class:`InferenceResponse` (:func:`model.analyze.assemble`).
In the pipeline they travel through the broker: the gpu worker never reads the spool. An
:class:`InferenceRequest` carries the prepared model inputs of one study episode: each image is the normalised
``(3, S, S)`` model input as float16 bytes (zlib-compressed, base64 text; float32 where it never leaves the
process), with the letterbox transform that maps its 0–100 grid boxes back to source pixels; the tasks name an
image and an instruction. The :class:`InferenceResponse` carries the raw model text per task.

Both are pydantic models (``extra="forbid"``, frozen) and travel as plain JSON objects (:meth:`to_message` /
:meth:`from_message`), so Celery's pickle-free ``json`` serializer carries them. Measured on a phantom chest
radiograph: 224 px → 0.30 MB of JSON per image (raw float16 0.30 MB, base64 alone 0.40 MB); 448 px → 1.2 MB.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.result import ModelIdentity
from model.imaging import Letterbox
from model.prompts import IMAGE_PLACEHOLDER

PAYLOAD_SCHEMA_VERSION = 1
MAX_NEW_TOKENS = 1024
ZLIB_LEVEL = 1  # fast; float16 images gain most of what zlib can give at level 1

TaskName = Literal["report", "grounding", "detection", "refer", "identify", "vqa"]
ArrayDType = Literal["float16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadError(ValueError):
    """A request or response cannot be decoded: names the field and the rule."""


class ArrayBlob(_Strict):
    """A numpy array as little-endian bytes, optionally zlib-compressed, in base64 text."""

    dtype: ArrayDType
    shape: tuple[int, ...] = Field(min_length=1, max_length=4)
    compression: Literal["none", "zlib"] = "zlib"
    data: str = Field(description="base64 of the (compressed) little-endian C-order bytes")

    @classmethod
    def encode(cls, array: np.ndarray, dtype: ArrayDType = "float16", compression: Literal["none", "zlib"] = "zlib"
               ) -> ArrayBlob:
        values = np.asarray(array)
        if not np.issubdtype(values.dtype, np.floating):
            raise PayloadError(f"array dtype {values.dtype} must be floating point")
        if not np.isfinite(values).all():
            raise PayloadError("array holds NaN or infinite values")
        raw = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        if compression == "zlib":
            raw = zlib.compress(raw, ZLIB_LEVEL)
        return cls(dtype=dtype, shape=tuple(values.shape), compression=compression,
                   data=base64.b64encode(raw).decode("ascii"))

    def decode(self) -> np.ndarray:
        """The array in its stored dtype (native byte order)."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"array data is not valid base64: {exc}") from exc
        if self.compression == "zlib":
            try:
                raw = zlib.decompress(raw)
            except zlib.error as exc:
                raise PayloadError(f"array data is not valid zlib: {exc}") from exc
        stored = np.dtype(self.dtype).newbyteorder("<")
        expected = int(np.prod(self.shape)) * stored.itemsize
        if len(raw) != expected:
            raise PayloadError(f"array data has {len(raw)} bytes, shape {self.shape} of {self.dtype} needs {expected}")
        return np.frombuffer(raw, dtype=stored).astype(self.dtype).reshape(self.shape)


class TransformSpec(_Strict):
    """The fields of :class:`model.imaging.Letterbox`: where the source image lies in the model square."""

    source_rows: int = Field(ge=1)
    source_cols: int = Field(ge=1)
    model_size: int = Field(ge=1)

    @classmethod
    def from_letterbox(cls, transform: Letterbox) -> TransformSpec:
        return cls(source_rows=transform.source_rows, source_cols=transform.source_cols,
                   model_size=transform.model_size)

    def to_letterbox(self) -> Letterbox:
        return Letterbox(self.source_rows, self.source_cols, self.model_size)


class ModelImage(_Strict):
    """One model input. The study view (report input of a series: a CT projection or a montage) has no instance
    and no transform."""

    key: str = Field(min_length=1, description="unique in the request; tasks refer to it")
    sop_instance_uid: str | None = None
    frame: int = Field(0, ge=0, description="0-based frame index, as model.imaging.prepare_image takes it")
    number_of_frames: int = Field(1, ge=1, description="frames of the source image: a finding on an image of "
                                  "several names its frame (requests written before this field: 1)")
    pixels: ArrayBlob
    transform: TransformSpec | None = None

    @classmethod
    def build(cls, key: str, pixels: np.ndarray, *, sop_instance_uid: str | None = None, frame: int = 0,
              number_of_frames: int = 1, transform: Letterbox | None = None, dtype: ArrayDType = "float16"
              ) -> ModelImage:
        return cls(key=key, sop_instance_uid=sop_instance_uid, frame=frame, number_of_frames=number_of_frames,
                   pixels=ArrayBlob.encode(pixels, dtype),
                   transform=None if transform is None else TransformSpec.from_letterbox(transform))

    @property
    def frame_number(self) -> int | None:
        """The 1-based frame of a multi-frame source image (as the SR and GSPS reference it); None otherwise."""
        return self.frame + 1 if self.number_of_frames > 1 else None

    @model_validator(mode="after")
    def _check(self) -> Self:
        shape = self.pixels.shape
        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
            raise ValueError(f"image {self.key!r}: pixels must have shape (3, S, S), got {shape}")
        if self.transform is not None and self.transform.model_size != shape[1]:
            raise ValueError(f"image {self.key!r}: transform.model_size {self.transform.model_size} differs from "
                             f"the pixel size {shape[1]}")
        if self.frame >= self.number_of_frames:
            raise ValueError(f"image {self.key!r}: frame index {self.frame} is outside its {self.number_of_frames} "
                             "frame(s)")
        if (self.sop_instance_uid is None) != (self.transform is None):
            raise ValueError(f"image {self.key!r}: an instance image needs sop_instance_uid and transform, an "
                             "overview has neither")
        return self

    def array(self) -> np.ndarray:
        """(3, S, S) float32 model input."""
        return self.pixels.decode().astype(np.float32)


class ModelTask(_Strict):
    task_id: str = Field(min_length=1, description="unique in the request; the response answers by it")
    image: str = Field(min_length=1, description="key of a ModelImage of the same request")
    task: TaskName
    instruction: str = Field(min_length=1)
    max_new_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if IMAGE_PLACEHOLDER in self.instruction:
            raise ValueError(f"task {self.task_id!r}: instruction must not contain {IMAGE_PLACEHOLDER!r}")
        return self


class _Message(_Strict):
    def to_message(self) -> dict[str, Any]:
        """A JSON-safe dict (for Celery's ``json`` serializer)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_message(cls, message: Any) -> Self:
        if not isinstance(message, dict):
            raise PayloadError(f"{cls.__name__} message must be a JSON object, got {type(message).__name__}")
        version = message.get("schema_version")
        if version != PAYLOAD_SCHEMA_VERSION:
            raise PayloadError(f"{cls.__name__} schema_version {version!r} is not {PAYLOAD_SCHEMA_VERSION}")
        return cls.model_validate(message)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        return cls.model_validate_json(data)


class InferenceRequest(_Message):
    schema_version: Literal[1] = PAYLOAD_SCHEMA_VERSION
    request_id: str = Field(min_length=1)
    study_instance_uid: str = Field(min_length=1)
    episode_id: int = Field(ge=0)
    model_size: int = Field(ge=1, description="S of every (3, S, S) image; must match the model's input size")
    images: list[ModelImage] = Field(min_length=1)
    tasks: list[ModelTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        keys = [image.key for image in self.images]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"image keys must be unique, repeated: {duplicates}")
        ids = [task.task_id for task in self.tasks]
        duplicates = sorted({t for t in ids if ids.count(t) > 1})
        if duplicates:
            raise ValueError(f"task ids must be unique, repeated: {duplicates}")
        for image in self.images:
            if image.pixels.shape[1] != self.model_size:
                raise ValueError(f"image {image.key!r} is {image.pixels.shape[1]} px, model_size is {self.model_size}")
        for task in self.tasks:
            if task.image not in keys:
                raise ValueError(f"task {task.task_id!r} refers to image {task.image!r}, which is not in the request")
        return self

    def image(self, key: str) -> ModelImage:
        for image in self.images:
            if image.key == key:
                return image
        raise KeyError(f"image {key!r} is not in request {self.request_id}")


class TaskOutput(_Strict):
    task_id: str
    text: str


class InferenceResponse(_Message):
    schema_version: Literal[1] = PAYLOAD_SCHEMA_VERSION
    request_id: str
    study_instance_uid: str
    episode_id: int = Field(ge=0)
    model: ModelIdentity
    outputs: list[TaskOutput]
    batch_rows: int = Field(ge=1, description="rows of the generate call this request was part of")
    seconds: float = Field(ge=0, description="wall time of that generate call")

    def texts(self) -> dict[str, str]:
        return {output.task_id: output.text for output in self.outputs}
