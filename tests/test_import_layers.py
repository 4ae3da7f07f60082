"""The contracts of pyproject.toml ([tool.importlinter], issue 18) hold on this tree and break on a back-arrow: each
case copies the packages' Python files to a temporary folder, adds one import that runs up the layers (or into the
tests, or from production into the phantoms or the training) and expects ``lint-imports`` to fail naming it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "state", "dicom_node", "model", "reporting", "workers", "worklist", "raddraft", "peers", "bench",
            "tests")
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=root, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)


def sources_only(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: every file but the Python ones, and the bytecode caches."""
    return [n for n in names if n == "__pycache__" or (not n.endswith(".py") and not (Path(folder) / n).is_dir())]


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("house")
    shutil.copy(REPO / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=sources_only)
    return root


def test_the_contract_holds_on_this_tree() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "message"), [
    ("model/slices.py", "import workers.gate", "model is not allowed to import workers"),
    ("model/weights.py", "import raddraft.cli", "model is not allowed to import raddraft"),
    ("reporting/sr.py", "import workers.prepare", "reporting is not allowed to import workers"),
    ("dicom_node/derived.py", "import reporting.context", "dicom_node is not allowed to import reporting"),
    ("dicom_node/spool.py", "import model.imaging", "dicom_node is not allowed to import model"),
    ("core/metrics.py", "import dicom_node.index", "core is not allowed to import dicom_node"),
    # the pipeline's state store sits below the node that writes it and above the ground
    ("state/store.py", "import dicom_node.index", "state is not allowed to import dicom_node"),
    ("state/database.py", "import workers.tasks", "state is not allowed to import workers"),
    ("core/states.py", "import state.store", "core is not allowed to import state"),
    ("model/slices.py", "import state.store", "model.slices -> state.store"),
    ("worklist/service.py", "import raddraft.cli", "worklist is not allowed to import raddraft"),
    # the pipeline tells the worklist with tasks sent by name (workers/announce.py): no arrow to the worklist at all,
    # not even the three the contract once ignored (the report stage and dead-lettering wrote into its database)
    ("workers/delivery.py", "import worklist.storage", "workers is not allowed to import worklist"),
    ("workers/pipeline.py", "from worklist.bridge import register_draft", "workers is not allowed to import worklist"),
    ("workers/deadletter.py", "import worklist.bridge", "workers is not allowed to import worklist"),
    ("workers/tasks.py", "import worklist.tasks", "workers is not allowed to import worklist"),
    ("workers/gate.py", "import tests.node_helpers", "workers.gate -> tests.node_helpers"),
    ("workers/gate.py", "import peers", "workers.gate -> peers"),
    # the benchmarks use the real peers of peers/, never the tests' helpers (bench/ingest.py once did)
    ("bench/ingest.py", "import tests.node_helpers", "bench.ingest -> tests.node_helpers"),
    # production never imports the phantom generator or the training code (workers/pipeline.py once did)
    ("workers/pipeline.py", "import model.examples", "workers.pipeline -> model.examples"),
    ("model/imaging.py", "import model.phantoms", "model.imaging is not allowed to import model.phantoms"),
    ("raddraft/analyze_output.py", "import model.training",
     "raddraft.analyze_output is not allowed to import model.training"),
])
def test_a_back_arrow_breaks_the_contract(copy: Path, module: str, line: str, message: str) -> None:
    path = copy / module
    original = path.read_text(encoding="utf-8")
    path.write_text(f"{original}\n{line}  # a back-arrow\n", encoding="utf-8")
    try:
        result = lint_imports(copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode == 1, result.stdout + result.stderr
    broken = ALSO_BROKEN.get((module, line), 0) + 1
    assert message in result.stdout and f"{broken} broken" in result.stdout, result.stdout


# arrows that break a second contract as well, rightly: the benchmarks import the pipeline (bench/stages.py), so
# the pipeline's arrow into the tests is one of theirs too
ALSO_BROKEN = {("workers/gate.py", "import tests.node_helpers"): 1}
