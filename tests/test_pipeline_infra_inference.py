"""Batched inference on a tiny random-weight model: one generate call for several studies, same texts as alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_infra_helpers import TINY, request, tiny_model_folder

from core.settings import Settings
from model import analyze
from model.embedded import LoadedModel
from workers import inference


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def loaded(model_folder: Path) -> LoadedModel:
    inference.clear_cache()
    return inference.get_model(str(model_folder), "cpu")


def test_model_is_loaded_once_per_process(model_folder: Path) -> None:
    inference.clear_cache()
    first = inference.get_model(str(model_folder), "cpu")
    assert inference.get_model(str(model_folder), "cpu") is first
    assert first.model.config.name == TINY.name and not first.model.training
    inference.clear_cache()
    assert inference.get_model(str(model_folder), "cpu") is not first


def test_batch_of_two_requests_gives_the_texts_of_each_alone(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    a = request("1.2.3.1", [1, 2], tokens=10)
    b = request("1.2.3.2", [3], detection="pleural effusion", tokens=6)
    calls: list[int] = []
    generate = loaded.model.generate_ids

    def counting(images: torch.Tensor, instructions: list[str], max_new_tokens: int = 300) -> list[list[int]]:
        calls.append(images.shape[0])
        return generate(images, instructions, max_new_tokens)

    monkeypatch.setattr(loaded.model, "generate_ids", counting)
    together = analyze.run_batch(loaded, [a, b])
    assert calls == [5]  # ONE generate call: 3 rows of a + 2 rows of b
    alone = analyze.run_batch(loaded, [a]) + analyze.run_batch(loaded, [b])
    assert [r.texts() for r in together] == [r.texts() for r in alone]
    assert [r.request_id for r in together] == [a.request_id, b.request_id]
    assert together[0].batch_rows == 5 and alone[0].batch_rows == 3
    texts = [t for r in together for t in r.texts().values()]
    assert sum(bool(t) for t in texts) >= 3 and len(set(texts)) > 2  # the random model says different things
    # each row is cut to its own max_new_tokens: b's 6-token answers are not longer than 6 tokens
    tokenizer = loaded.model.tokenizer
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 6
               for k, t in together[1].texts().items() if k != "report")
    assert together[0].model == loaded.identity


def test_batch_rejects_a_wrong_image_size_and_repeated_ids(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"model_size 28 does not match the model's vision\.image_size 56"):
        analyze.run_batch(loaded, [request("1.2.3", [1], size=28)])
    with pytest.raises(ValueError, match="request ids in one batch must be unique"):
        analyze.run_batch(loaded, [request("1.2.3", [1]), request("1.2.3", [2])])
    assert analyze.run_batch(loaded, []) == []


def test_infer_uses_settings_model_and_threads(model_folder: Path, tmp_path: Path) -> None:
    inference.clear_cache()
    settings = Settings(home=tmp_path, model=str(model_folder), inference_device="cpu", inference_threads=1)
    before = torch.get_num_threads()
    try:
        [response] = inference.infer(settings, [request("1.2.3", [4], tokens=4)])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert response.model.name == TINY.name and set(response.texts()) == {"report", "boxes:1.2.3.1"}


def test_device_and_thread_settings_are_checked() -> None:
    assert inference.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        inference.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA"):
            inference.resolve_device("cuda")
    with pytest.raises(ValueError, match="threads 0 must be at least 1"):
        inference.set_threads(0)


def test_weights_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu(model_folder: Path) -> None:
    assert inference.resolve_dtype("auto", torch.device("cuda:1")) is torch.bfloat16
    assert inference.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert inference.resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="inference dtype 'int8' must be auto, float32, bfloat16, float16"):
        inference.resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="inference_dtype"):
        Settings(inference_dtype="int8")
    inference.clear_cache()
    auto = inference.get_model(str(model_folder), "cpu")
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}
    half = inference.get_model(str(model_folder), "cpu", "bfloat16")
    assert half is not auto and half.model.llm.get_input_embeddings().weight.dtype is torch.bfloat16
    assert half.model.visual_encoder.pos_embed.dtype is torch.bfloat16 and half.model.llama_proj.weight.dtype is \
        torch.bfloat16
    assert half.model.ln_vision.weight.dtype is torch.float32  # MiniGPT-Med's LayerNorm stays fp32
    [ids] = half.model.generate_ids(torch.zeros(1, 3, TINY.vision.image_size, TINY.vision.image_size),
                                    ["[grounding] describe this image in detail"], max_new_tokens=3)
    assert 1 <= len(ids) <= 3


def test_every_user_of_the_model_in_a_process_gets_the_one_copy_in_the_settings_dtype(model_folder: Path, caplog
                                                                                        ) -> None:
    """The infer tasks load the model in ``inference_dtype``; the model socket (analyze and questions), the warm-up
    and the in-process worklist answerer loaded it in the default dtype: a second copy whenever the setting was
    not ``auto``. They all go through :func:`inference.settings_model` now."""
    from raddraft.analyze_output import question_handler  # noqa: PLC0415 - the socket's handler
    from raddraft.model_socket import AskRequest, normalize_model_spec  # noqa: PLC0415
    from worklist.answerer import SharedModelAnswerer  # noqa: PLC0415

    settings = Settings(model=str(model_folder), inference_device="cpu", inference_dtype="bfloat16")
    inference.clear_cache()
    with caplog.at_level(logging.INFO, logger="workers.inference"):
        first = inference.settings_model(settings)
        size = TINY.vision.image_size
        pixels = np.zeros((3, size, size), dtype=np.float32)
        SharedModelAnswerer(settings, size).answer(pixels, "[vqa] is there a nodule?")
        handler = question_handler(settings)
        assert handler is not None
        ask = AskRequest(model=normalize_model_spec(settings.model), instruction="[vqa] is there a nodule?",
                         shape=pixels.shape, size=pixels.nbytes)
        assert isinstance(handler.answer(ask, pixels), str)
        assert inference.continuous_batcher(settings) is not None
    loads = [r for r in caplog.records if "loaded on" in r.getMessage()]
    assert len(loads) == 1 and inference.settings_model(settings) is first
    assert first.model.llama_proj.weight.dtype is torch.bfloat16
