"""Where the shipped model lives and how ``settings.model`` picks a model.

``settings.model`` is one of:

* ``"embedded"``: the checkpoint shipped inside the package, ``model/weights/raddraft-small/`` (fp16 safetensors,
  config.json, tokenizer; trained on synthetic phantoms only — see its MODEL_CARD.md);
* a preset name: ``raddraft-small`` gives a freshly initialised (untrained) model, for tests and training;
  ``minigpt-med`` needs weights and is only loaded from a local folder (below);
* a folder path: a raddraft model folder (``config.json`` + ``model.safetensors``), or a MiniGPT-Med folder
  holding ``llama/`` (Llama-2-7b-chat in HF format), ``eva_vit_g.pth`` and ``checkpoint_stage3.pth``.

Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from core.result import ModelIdentity
from model import weights
from model.config import PRESETS
from model.minigpt import MiniGPTMed
from model.refine import REFINEMENT
from model.slices import SLICE_MERGE

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "weights" / "raddraft-small"
MINIGPT_MED_FILES = ("llama", "eva_vit_g.pth", "checkpoint_stage3.pth")
# what shaped the output besides the weights (DICOM TID 4019 algorithm parameters in the SR)
PARAMETERS = {"decoding": "greedy", "box_refinement": REFINEMENT, "slice_merge": SLICE_MERGE}


@dataclass(frozen=True)
class LoadedModel:
    model: MiniGPTMed
    identity: ModelIdentity
    trained: bool  # False for a freshly initialised preset


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def embedded_available() -> bool:
    return (EMBEDDED_DIR / weights.CONFIG_FILE).is_file()


def load_model(spec: str) -> LoadedModel:
    """The model named by *spec* (``settings.model``), in eval mode on the CPU."""
    if spec == "embedded":
        if not embedded_available():
            raise FileNotFoundError(f"the embedded model is missing: {EMBEDDED_DIR / weights.CONFIG_FILE} does not "
                                    "exist (train one with 'raddraft train' and export it with model.embedded.export)")
        return _load_folder(EMBEDDED_DIR)
    if spec in PRESETS:
        if spec == "minigpt-med":
            raise ValueError("model 'minigpt-med' has no weights here: set model to a local folder holding "
                             f"{', '.join(MINIGPT_MED_FILES)}")
        logger.warning("model %s is freshly initialised: its output is meaningless", spec)
        model = MiniGPTMed.from_preset(spec).eval()
        return LoadedModel(model, ModelIdentity(name=spec, version="untrained", parameters=dict(PARAMETERS)),
                           trained=False)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model {spec!r} must be 'embedded', a preset ({', '.join(sorted(PRESETS))}) or an existing "
                         "folder")
    if (folder / weights.CONFIG_FILE).is_file():
        return _load_folder(folder)
    if all((folder / name).exists() for name in MINIGPT_MED_FILES):
        model = MiniGPTMed.from_minigpt_med(folder / "llama", folder / "eva_vit_g.pth",
                                            folder / "checkpoint_stage3.pth").eval()
        version = _fingerprint(folder / "checkpoint_stage3.pth")
        return LoadedModel(model, ModelIdentity(name="minigpt-med", version=version,
                                                parameters=dict(PARAMETERS)), trained=True)
    raise FileNotFoundError(f"{folder} holds neither a raddraft model ({weights.CONFIG_FILE}) nor the MiniGPT-Med "
                            f"files {', '.join(MINIGPT_MED_FILES)}")


def _load_folder(folder: Path) -> LoadedModel:
    model = MiniGPTMed.load(folder).eval()
    version = _fingerprint(folder / weights.WEIGHTS_FILE)
    logger.info("loaded model %s (weights %s) from %s", model.config.name, version, folder)
    return LoadedModel(model, ModelIdentity(name=model.config.name, version=version,
                                            parameters=dict(PARAMETERS)), trained=True)


def export(source: Path, destination: Path = EMBEDDED_DIR) -> Path:
    """Write the model folder *source* to *destination* with floating-point tensors stored as fp16."""
    model = MiniGPTMed.load(source)
    tensors = {name: t.half() if t.is_floating_point() else t for name, t in model.state_dict().items()}
    weights.write_folder(destination, model.config, tensors, model.tokenizer)
    size = (destination / weights.WEIGHTS_FILE).stat().st_size
    logger.info("exported %s as fp16 (%.1f MB) to %s", source, size / 1e6, destination)
    return destination

