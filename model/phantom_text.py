"""Radiology-style reports (FINDINGS + IMPRESSION) and VQA pairs for phantom studies, with varied wording."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from model.phantom_anatomy import DrawnFinding

MODALITY_NAMES = {"CR": "X-ray", "DX": "X-ray", "CT": "CT", "MR": "MRI"}

_RADIOGRAPH_SENTENCES = {
    "nodule": ["There is a {size} mm nodule in the {side} {site}.",
               "A {size} mm pulmonary nodule is seen in the {side} {site}.",
               "A well-defined nodular opacity measuring {size} mm projects over the {side} {site}."],
    "mass": ["There is a {size} mm mass in the {side} {site}.",
             "A lobulated {size} mm mass is present in the {side} {site}.",
             "A large opacity in keeping with a mass, {size} mm, occupies the {side} {site}."],
    "pleural effusion": ["There is a {side} pleural effusion with a meniscus at the {side} base.",
                         "Blunting of the {side} costophrenic angle with a meniscus indicates a {side} pleural "
                         "effusion.",
                         "A {side} pleural effusion layers at the {side} lung base."],
    "pneumothorax": ["There is a {side} apical pneumothorax with a visible pleural line.",
                     "A visceral pleural line is seen at the {side} apex with absent lung markings beyond it, "
                     "consistent with a {side} pneumothorax.",
                     "A {side} pneumothorax is present; the lung edge is displaced from the chest wall."],
    "consolidation": ["There is patchy consolidation in the {side} {site}.",
                      "Airspace opacity in the {side} {site} is consistent with consolidation.",
                      "Patchy airspace consolidation is seen in the {side} {site}."],
    "cardiomegaly": ["The heart is enlarged, with a cardiothoracic ratio of {ctr}.",
                     "Cardiomegaly: the cardiothoracic ratio measures {ctr}.",
                     "The cardiac silhouette is enlarged (cardiothoracic ratio {ctr})."],
}
_IMPRESSIONS = {
    "nodule": ["{side} {site} pulmonary nodule.", "{count_word} {side} lung nodule."],
    "mass": ["{side} lung mass.", "{side} {site} mass; further evaluation with CT is advised."],
    "pleural effusion": ["{side} pleural effusion.", "Small to moderate {side} pleural effusion."],
    "pneumothorax": ["{side} pneumothorax.", "{side} apical pneumothorax."],
    "consolidation": ["{side} {site} consolidation, likely pneumonia in the appropriate clinical setting.",
                      "{side} {site} consolidation."],
    "cardiomegaly": ["Cardiomegaly.", "Enlarged cardiac silhouette."],
}
_RADIOGRAPH_NORMALS = {
    "heart": ["The heart size is normal.", "The cardiomediastinal silhouette is within normal limits."],
    "pleura": ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."],
    "lungs": ["The lungs are clear.", "No focal consolidation.", "The lungs are clear without focal opacity."],
}
_NORMAL_IMPRESSIONS = {
    "radiograph": ["No acute cardiopulmonary abnormality.", "Normal chest radiograph.", "No active disease."],
    "CT": ["No pulmonary nodule.", "Normal CT of the chest slices provided.", "No acute abnormality."],
    "MR": ["No intracranial mass.", "Normal MRI of the brain slices provided.", "No acute intracranial abnormality."],
}
_COUNT_WORDS = {1: "Solitary", 2: "Two", 3: "Three"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, finding: DrawnFinding, **extra: str) -> str:
    text = template.format(side=finding.laterality or "", site=finding.site, size=round(finding.size_mm), **extra)
    return text[0].upper() + text[1:]


def write_report(rng: np.random.Generator, modality: str, findings: Sequence[DrawnFinding],
                 ctr: float | None = None) -> str:
    """FINDINGS and IMPRESSION, as ``core.result.DraftReport.text`` lays them out."""
    if modality in ("CR", "DX"):
        body, impression = _radiograph_report(rng, findings, ctr)
    elif modality == "CT":
        body, impression = _ct_report(rng, findings)
    elif modality == "MR":
        body, impression = _mr_report(rng, findings)
    else:
        raise ValueError(f"modality {modality!r} must be CR, DX, CT or MR")
    return f"FINDINGS:\n{' '.join(body)}\n\nIMPRESSION:\n{' '.join(impression)}"


def _radiograph_report(rng: np.random.Generator, findings: Sequence[DrawnFinding], ctr: float | None
                       ) -> tuple[list[str], list[str]]:
    labels = Counter(f.label for f in findings)
    body, impression = [], []
    for finding in findings:
        body.append(_fill(_pick(rng, _RADIOGRAPH_SENTENCES[finding.label]), finding, ctr=f"{ctr or 0:.2f}"))
        options = _IMPRESSIONS[finding.label]
        if labels[finding.label] > 1:  # one impression line per finding: a count would name the others' side too
            options = [o for o in options if "{count_word}" not in o]
        impression.append(_fill(_pick(rng, options), finding, count_word=_COUNT_WORDS[1]))
    if "cardiomegaly" not in labels:
        body.append(_pick(rng, _RADIOGRAPH_NORMALS["heart"]))
    if not labels.keys() & {"pleural effusion", "pneumothorax"}:
        body.append(_pick(rng, _RADIOGRAPH_NORMALS["pleura"]))
    if not labels.keys() & {"nodule", "mass", "consolidation"}:
        body.append(_pick(rng, _RADIOGRAPH_NORMALS["lungs"]))
    return body, list(dict.fromkeys(impression)) or [_pick(rng, _NORMAL_IMPRESSIONS["radiograph"])]


def _ct_report(rng: np.random.Generator, findings: Sequence[DrawnFinding]) -> tuple[list[str], list[str]]:
    body = []
    for finding in findings:
        body.append(_fill(_pick(rng, ["A {size} mm solid nodule is present in the {side} {site}.",
                                      "There is a {size} mm solid pulmonary nodule in the {side} {site}.",
                                      "Solid nodule in the {side} {site} measuring {size} mm."]), finding))
    body.append(_pick(rng, ["No pleural effusion.", "The pleural spaces are clear."]))
    body.append(_pick(rng, ["The mediastinal structures are unremarkable.", "The heart and great vessels are "
                            "normal in appearance."]))
    if not findings:
        body.insert(0, _pick(rng, ["The lungs are clear without nodules.", "No pulmonary nodule is identified."]))
        return body, [_pick(rng, _NORMAL_IMPRESSIONS["CT"])]
    count = len(findings)
    sides = sorted({f.laterality for f in findings if f.laterality})
    where = " and ".join(sides)
    impression = (f"{_COUNT_WORDS.get(count, 'Multiple')} {where} pulmonary nodule{'s' if count > 1 else ''}"
                  f"{', the largest ' + str(round(max(f.size_mm for f in findings))) + ' mm' if count > 1 else ''}.")
    return body, [impression, _pick(rng, ["Follow-up CT is recommended.", "Recommend follow-up per Fleischner "
                                          "guidelines."])]


def _mr_report(rng: np.random.Generator, findings: Sequence[DrawnFinding]) -> tuple[list[str], list[str]]:
    tumour = next((f for f in findings if f.label == "tumor"), None)
    if tumour is None:
        return ([_pick(rng, ["The brain parenchyma is normal in signal.", "No mass or abnormal signal."]),
                 _pick(rng, ["The ventricles are normal in size.", "No midline shift."])],
                [_pick(rng, _NORMAL_IMPRESSIONS["MR"])])
    body = [
        _fill(_pick(rng, ["There is a {size} mm mass in the {side} {site} with a necrotic centre.",
                          "A {size} mm heterogeneous tumor is present in the {side} {site}.",
                          "A rim-enhancing-appearing {size} mm lesion is seen in the {side} {site}."]), tumour),
        _fill(_pick(rng, ["It is surrounded by vasogenic edema.",
                          "Surrounding FLAIR hyperintensity is consistent with edema.",
                          "There is extensive perilesional edema in the {side} hemisphere."]), tumour),
        _pick(rng, ["The ventricles are normal in size.", "No hydrocephalus."]),
    ]
    impression = [_fill(_pick(rng, ["{side} {site} tumor with surrounding edema.",
                                    "{side} {site} mass with perilesional edema, likely a high-grade glioma."]),
                        tumour)]
    return body, impression


def make_qa(rng: np.random.Generator, modality: str, findings: Sequence[DrawnFinding]) -> list[dict[str, str]]:
    """Presence, side, counting, size and modality questions with their answers."""
    labels = Counter(f.label for f in findings)
    qa = [{"question": _pick(rng, ["What imaging modality is this?", "What type of imaging is this?"]),
           "answer": MODALITY_NAMES[modality]}]
    if modality in ("CR", "DX"):
        asked = ["pleural effusion", "pneumothorax", "consolidation", "nodule"]
        for label in asked:
            article = "an" if label[0] in "aeiou" else "a"
            qa.append({"question": f"Is there {article} {label}?", "answer": "yes" if label in labels else "no"})
        qa.append({"question": "Is the heart enlarged?", "answer": "yes" if "cardiomegaly" in labels else "no"})
        qa.append({"question": "How many nodules are there?", "answer": str(labels["nodule"])})
    elif modality == "CT":
        qa.append({"question": "Is there a lung nodule?", "answer": "yes" if labels["nodule"] else "no"})
        qa.append({"question": "How many nodules are there?", "answer": str(labels["nodule"])})
    else:
        qa.append({"question": "Is there a brain tumor?", "answer": "yes" if labels["tumor"] else "no"})
        qa.append({"question": "Is there edema?", "answer": "yes" if labels["edema"] else "no"})
    for label in dict.fromkeys(f.label for f in findings):
        sides = {f.laterality for f in findings if f.label == label and f.laterality}
        if sides:
            answer = sides.pop() if len(sides) == 1 else "both"
            qa.append({"question": f"Which side is the {label} on?", "answer": answer})
    return qa
