"""The pipeline's state store (state/store.py): the episode state machine has no state that nothing sets."""

from __future__ import annotations

import ast
from pathlib import Path

from core.states import EpisodeState
from state.store import IN_FLIGHT_STATES


def test_every_episode_state_is_reached_by_the_pipeline():
    """The state machine has no state that nothing sets (``analysing`` and ``analysed`` were never set, so the
    in-flight rule that named them did not hold the next episode back)."""
    root = Path(__file__).resolve().parent.parent
    used: set[str] = set()
    for path in [*(root / "state").glob("*.py"), *(root / "dicom_node").glob("*.py"),
                 *(root / "workers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "EpisodeState":
                used.add(node.attr)
    declared = {state.name for state in EpisodeState}
    in_flight_only = {state.name for state in IN_FLIGHT_STATES}
    assert declared <= used, declared - used
    assert in_flight_only == {"QUEUED", "PREPARING", "PREPARED"}

