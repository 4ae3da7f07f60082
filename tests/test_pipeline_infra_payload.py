"""InferenceRequest / InferenceResponse: round trips through JSON and Celery's json serializer, sizes, errors."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
from kombu.serialization import dumps, loads
from pipeline_infra_helpers import request
from pydantic import ValidationError

from core.result import ModelIdentity
from model.imaging import prepare_image
from model.payload import (
    ArrayBlob,
    InferenceRequest,
    InferenceResponse,
    ModelImage,
    ModelTask,
    PayloadError,
    TaskOutput,
    TransformSpec,
)
from model.phantoms import generate_studies


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_array_blob_round_trip(dtype: str, compression: str) -> None:
    values = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    blob = ArrayBlob.encode(values, dtype, compression)  # type: ignore[arg-type]
    decoded = ArrayBlob.model_validate_json(blob.model_dump_json()).decode()
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (3, 8, 8)
    np.testing.assert_array_equal(decoded, values.astype(dtype))
    assert decoded.flags.writeable


def test_array_blob_rejects_bad_data() -> None:
    blob = ArrayBlob.encode(np.zeros((2, 2), np.float32))
    with pytest.raises(PayloadError, match="not valid base64"):
        blob.model_copy(update={"data": "***"}).decode()
    with pytest.raises(PayloadError, match="not valid zlib"):
        blob.model_copy(update={"data": base64.b64encode(b"plain").decode()}).decode()
    short = base64.b64encode(zlib.compress(b"\0" * 6)).decode()
    with pytest.raises(PayloadError, match=r"has 6 bytes, shape \(2, 2\) of float16 needs 8"):
        blob.model_copy(update={"data": short}).decode()
    with pytest.raises(PayloadError, match="NaN or infinite"):
        ArrayBlob.encode(np.array([1.0, np.nan]))
    with pytest.raises(PayloadError, match="must be floating point"):
        ArrayBlob.encode(np.array([1, 2]))


def test_request_round_trips_through_celery_json_serializer() -> None:
    original = request("1.2.3", [1, 2])
    content_type, encoding, body = dumps(original.to_message(), serializer="json")
    assert content_type == "application/json"
    back = InferenceRequest.from_message(loads(body, content_type, encoding))
    assert back == original
    for a, b in zip(original.images, back.images, strict=True):
        np.testing.assert_array_equal(a.array(), b.array())
        assert b.transform is not None and b.transform.to_letterbox() == a.transform.to_letterbox()  # type: ignore[union-attr]
    assert InferenceRequest.from_json(original.to_json()) == original


def test_response_round_trip() -> None:
    response = InferenceResponse(
        request_id="r1", study_instance_uid="1.2.3", episode_id=2,
        model=ModelIdentity(name="raddraft-small", version="abc", parameters={"decoding": "greedy"}),
        outputs=[TaskOutput(task_id="report", text="FINDINGS: ok <p>x</p> {<1><2><3><4>}")], batch_rows=3, seconds=0.5,
    )
    back = InferenceResponse.from_message(json.loads(json.dumps(response.to_message())))
    assert back == response and back.texts() == {"report": "FINDINGS: ok <p>x</p> {<1><2><3><4>}"}


def test_size_of_a_224_px_radiograph() -> None:
    """A real (phantom) radiograph at 224 px: float16 + zlib in base64 JSON is under 0.4 MB per image."""
    ds = next(generate_studies(3, 1, "CR")).datasets[0]
    prepared = prepare_image(ds, 224)
    image = ModelImage.build("a", prepared.pixels, sop_instance_uid=str(ds.SOPInstanceUID),
                             transform=prepared.transform)
    size = len(image.model_dump_json())
    assert 100_000 < size < 400_000  # raw float16 (3, 224, 224) is 301 056 bytes, 401 408 as base64
    assert np.abs(image.array() - prepared.pixels).max() < 2e-3  # float16 rounding only


def test_request_validation_names_the_rule() -> None:
    good = request("1.2.3", [1])
    image = good.images[0]
    with pytest.raises(ValidationError, match="image keys must be unique"):
        InferenceRequest.model_validate({**good.model_dump(), "images": [image.model_dump()] * 2})
    with pytest.raises(ValidationError, match="refers to image 'nope'"):
        InferenceRequest.model_validate({**good.model_dump(), "tasks": [{**good.tasks[0].model_dump(),
                                                                         "image": "nope"}]})
    with pytest.raises(ValidationError, match="task ids must be unique"):
        InferenceRequest.model_validate({**good.model_dump(), "tasks": [good.tasks[0].model_dump()] * 2})
    with pytest.raises(ValidationError, match="model_size is 28"):
        InferenceRequest.model_validate({**good.model_dump(), "model_size": 28})
    with pytest.raises(ValidationError, match=r"pixels must have shape \(3, S, S\)"):
        ModelImage(key="x", pixels=ArrayBlob.encode(np.zeros((1, 4, 4), np.float32)))
    with pytest.raises(ValidationError, match="needs sop_instance_uid and transform"):
        ModelImage(key="x", sop_instance_uid="1.2", pixels=ArrayBlob.encode(np.zeros((3, 4, 4), np.float32)))
    with pytest.raises(ValidationError, match=r"transform\.model_size 8 differs"):
        ModelImage(key="x", sop_instance_uid="1.2", pixels=ArrayBlob.encode(np.zeros((3, 4, 4), np.float32)),
                   transform=TransformSpec(source_rows=4, source_cols=4, model_size=8))
    with pytest.raises(ValidationError, match="must not contain '<ImageHere>'"):
        ModelTask(task_id="t", image="x", task="vqa", instruction="a <ImageHere>", max_new_tokens=4)
    with pytest.raises(ValidationError, match="extra"):
        InferenceRequest.model_validate({**good.model_dump(), "patient_name": "X"})
    with pytest.raises(PayloadError, match="schema_version 2 is not 1"):
        InferenceRequest.from_message({**good.to_message(), "schema_version": 2})
    with pytest.raises(PayloadError, match="must be a JSON object"):
        InferenceRequest.from_message([1, 2])
