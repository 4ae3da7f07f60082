"""Questions to the model from the worklist: a real (small, untrained) MiniGPT-Med answers through the bridge."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pydicom
import pytest
import torch
from worklist_helpers import Client, settings_for, write_draft

from model.imaging import prepare_image
from model.minigpt import MiniGPTMed
from model.prompts import parse_grounded
from worklist import auth
from worklist.answerer import MiniGPTAnswerer
from worklist.app import WorklistApp
from worklist.bridge import Bridge, ModelUnavailableError
from worklist.server import RunningServer
from worklist.storage import Store


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return MiniGPTMed.from_preset("raddraft-small")


def test_ask_vqa_and_refer_through_the_bridge(tmp_path, small_model):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    try:
        user = store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                              organization="IR", now=datetime.now(UTC))
        draft = write_draft(settings)
        answerer = MiniGPTAnswerer(small_model, max_new_tokens=12)
        bridge = Bridge(settings, store, model=answerer)
        entry = bridge.register_draft(draft.manifest_path, draft.result_path)
        uid = draft.result.analysed_instances[0]

        answer = bridge.ask(entry, uid, frame_number=None, kind="refer", text="left lung nodule", user=user)
        assert answer.instruction == "[refer] where is left lung nodule ?"
        dataset = pydicom.dcmread(next(settings.spool_dir.rglob(f"{uid}.dcm")))
        prepared = prepare_image(dataset, answerer.image_size)
        images = torch.from_numpy(prepared.pixels)[None]
        with torch.inference_mode():
            expected = small_model.generate(images, [answer.instruction], max_new_tokens=12)[0]
        assert answer.raw == expected  # the bridge asked the model exactly this, on exactly this image
        parsed = parse_grounded(expected)
        assert answer.boxes == [prepared.transform.grid_to_source(b.as_tuple()) for b in parsed.boxes]
        assert answer.text == parsed.text

        vqa = bridge.ask(entry, uid, frame_number=None, kind="vqa", text="Is there a pleural effusion?", user=user)
        assert vqa.instruction == "[vqa] Is there a pleural effusion?"
        with pytest.raises(KeyError, match="is not in the manifest"):
            bridge.ask(entry, "1.2.3.4", frame_number=None, kind="vqa", text="?", user=user)
        with pytest.raises(ValueError, match="phrase must not be empty"):
            bridge.ask(entry, uid, frame_number=None, kind="vqa", text="   ", user=user)
        with pytest.raises(ModelUnavailableError, match="no model is connected"):
            Bridge(settings, store).ask(entry, uid, frame_number=None, kind="vqa", text="?", user=user)
        assert [e.action for e in store.audit_entries(entry)][:2] == ["ask-vqa", "ask-refer"]
    finally:
        store.close()


class CannedModel:
    """A QuestionModel that answers every instruction with one grounded box on the 0-100 grid."""

    image_size = 224

    def __init__(self) -> None:
        self.instructions: list[str] = []

    def answer(self, pixels, instruction):
        assert pixels.shape == (3, 224, 224)
        self.instructions.append(instruction)
        return "<p>left lung nodule</p> {<10><20><30><40>}"


def test_ask_over_http_returns_the_answer_with_its_box_in_source_pixels(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="IR", now=datetime.now(UTC))
        store.add_user("root", "admin", auth.hash_password("admin-pass"), full_name="Admin", organization="IR",
                       now=datetime.now(UTC))
        draft = write_draft(settings)
        model = CannedModel()
        bridge = Bridge(settings, store, model=model)
        entry = bridge.register_draft(draft.manifest_path, draft.result_path)
        with RunningServer(WorklistApp(bridge)) as server:
            admin = Client(server)  # before: an admin could ask the model
            admin.login("root", "admin-pass")
            assert not json.loads(admin.request("GET", f"/api/studies/{entry}")[1])["can_ask"]
            assert admin.post_json(f"/api/studies/{entry}/ask", {"image": 0, "kind": "vqa", "text": "effusion?"}) \
                == (403, {"error": "role 'admin' cannot ask the model"})
            client = Client(server)
            client.login()
            _, data, _ = client.request("GET", f"/api/studies/{entry}")
            assert json.loads(data)["can_ask"]
            status, body = client.post_json(f"/api/studies/{entry}/ask",
                                            {"image": 0, "kind": "refer", "text": "left lung nodule"})
        assert status == 200 and model.instructions == ["[refer] where is left lung nodule ?"]  # the admin's: none
        assert body["text"] == "left lung nodule" and body["image"] == 0 and body["dropped"] == []
        dataset = pydicom.dcmread(next(settings.spool_dir.rglob(f"{draft.result.analysed_instances[0]}.dcm")))
        expected = prepare_image(dataset, 224).transform.grid_to_source((10, 20, 30, 40))
        assert body["boxes"] == [pytest.approx(list(expected))]
        assert "ask-refer" in [e.action for e in store.audit_entries(entry)]
    finally:
        store.close()
