"""The typed result of analysing one study episode: what reporting, delivery and the worklist consume."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.jsonio import write_atomic

Laterality = Literal["left", "right", "bilateral"]
Polarity = Literal["positive", "negative", "normal", "neutral"]
# a positive sentence is grounded (a box supports it) or text_only (no image evidence found); negative,
# normal and neutral sentences are statements that need no box
SentenceStatus = Literal["grounded", "text_only", "statement"]
FindingStatus = Literal["grounded", "box_only"]  # box_only: no sentence of the report states it
FindingSource = Literal["grounding", "refer", "detection"]  # the model task that drew the box


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Finding(_Strict):
    """One localized finding. The box is in source-image pixels: (x1, y1, x2, y2) = (column, row) corners."""

    label: str = Field(min_length=1)
    sop_instance_uid: str
    frame_number: int | None = Field(None, ge=1, description="1-based frame of a multi-frame image")
    box: tuple[float, float, float, float]
    laterality: Laterality | None = None
    site: str | None = None
    description: str = ""
    tracking_uid: str | None = Field(None, description="the tracking UID of the same lesion in the study's "
                                     "previous report, when it was matched (reporting/lineage.py)")
    source: FindingSource = Field("grounding", description="the task that drew the box: the grounding pass, or "
                                  "a follow-up question on a sentence that had no box (model/grounding.py)")
    sentences: list[int] = Field(default_factory=list, description="indices into report.sentences of the "
                                 "sentences this box supports")
    status: FindingStatus | None = Field(None, description="grounded, box_only (no sentence states it); None "
                                         "in results written before drafts were grounded")

    @model_validator(mode="after")
    def _box_is_ordered(self) -> Finding:
        x1, y1, x2, y2 = self.box
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"box {self.box} must have x1 < x2 and y1 < y2")
        return self


class ModelIdentity(_Strict):
    """Algorithm identification (DICOM TID 4019): name, version and the parameters that shaped the output."""

    name: str
    version: str
    parameters: dict[str, str] = Field(default_factory=dict)


class ReportSentence(_Strict):
    """One sentence of the draft and what it states, linked to the findings that support it."""

    section: Literal["findings", "impression"]
    text: str = Field(min_length=1)
    polarity: Polarity
    labels: list[str] = Field(default_factory=list, description="the finding labels it states (positive only)")
    laterality: Laterality | None = None
    site: str | None = None
    findings: list[int] = Field(default_factory=list, description="indices into the result's findings")
    status: SentenceStatus


class Consistency(_Strict):
    """How far the draft's text and boxes agree: counts of grounded and text-only positive sentences and of
    box-only findings. ``flagged`` when anything is not grounded."""

    grounded: int = Field(ge=0)
    text_only: int = Field(ge=0)
    box_only: int = Field(ge=0)

    @property
    def flagged(self) -> bool:
        return bool(self.text_only or self.box_only)


class DraftReport(_Strict):
    findings: str
    impression: str
    sentences: list[ReportSentence] = Field(default_factory=list, description="the sentences of findings and "
                                            "impression, in order; empty in results written before grounding")

    @property
    def text(self) -> str:
        return f"FINDINGS:\n{self.findings}\n\nIMPRESSION:\n{self.impression}"


class DocumentReference(_Strict):
    """An earlier report document of the same study that this episode's documents supersede."""

    kind: Literal["sr", "narrative"]
    episode_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


class AnalysisResult(_Strict):
    study_instance_uid: str
    episode_id: int
    model: ModelIdentity
    report: DraftReport
    findings: list[Finding]
    analysed_instances: list[str] = Field(description="SOP Instance UIDs the model looked at")
    analysed_frames: dict[str, list[int]] = Field(
        default_factory=dict, description="the 1-based frames the model read of each multi-frame image of "
        "analysed_instances (results written before frames were read: empty)")
    raw_outputs: dict[str, str] = Field(default_factory=dict, description="model text per task/instance")
    status: Literal["preliminary", "final"] = "preliminary"
    created_at: datetime
    supersedes: list[DocumentReference] = Field(
        default_factory=list, description="the previous episode's report documents these outputs replace")
    consistency: Consistency | None = Field(None, description="text/box agreement of the grounded draft; None "
                                            "in results written before drafts were grounded")

    @model_validator(mode="after")
    def _frames_are_of_analysed_instances(self) -> AnalysisResult:
        for uid, frames in self.analysed_frames.items():
            if uid not in self.analysed_instances:
                raise ValueError(f"analysed_frames names SOP Instance UID {uid}, which is not in analysed_instances")
            if not frames or min(frames) < 1:
                raise ValueError(f"analysed_frames of SOP Instance UID {uid} must be 1-based frame numbers, got "
                                 f"{frames}")
        sentences = self.report.sentences
        for number, sentence in enumerate(sentences):
            for index in sentence.findings:
                if not 0 <= index < len(self.findings) or number not in self.findings[index].sentences:
                    raise ValueError(f"sentence {number} names finding {index}, which does not exist or does not "
                                     "name the sentence back")
        for number, finding in enumerate(self.findings):
            for index in finding.sentences:
                if not 0 <= index < len(sentences) or number not in sentences[index].findings:
                    raise ValueError(f"finding {number} names sentence {index}, which does not exist or does not "
                                     "name the finding back")
        return self

    def write(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2).encode())

    @classmethod
    def read(cls, path: Path) -> AnalysisResult:
        return cls.model_validate_json(path.read_bytes())
