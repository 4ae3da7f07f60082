"""The state enums that more than one package reads: an episode's (``state/store.py`` explains the life
cycle) and a delivery's, and the names of a delivery's output set. The state store keeps them; the pipeline, the
worklist, the metrics and the commands read them."""

from __future__ import annotations

from enum import StrEnum


class EpisodeState(StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    QUEUED = "queued"
    PREPARING = "preparing"
    PREPARED = "prepared"  # manifest written, inference requested: at or in the gpu stage
    REPORTED = "reported"
    DELIVERED = "delivered"
    NOT_ANALYSED = "not-analysed"  # an end state: the analysis gate (workers/gate.py) let nothing through
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    SKIPPED = "skipped"  # nothing of this kind was built for the output set (the reason is in last_error)


# Which output set of an episode a delivery sends (the ``output_set`` of a row of ``deliveries``): the draft the
# report stage wrote, or signed version n ("signed:<n>", written by the worklist's signing: core/layout.py
# version_dir says where).
DRAFT_OUTPUT = "draft"
_SIGNED_PREFIX = "signed:"


def signed_output(version: int) -> str:
    """The output set of signed version *version* (1 the first signature, n > 1 amendment n)."""
    if version < 1:
        raise ValueError(f"signed version {version} must be >= 1")
    return f"{_SIGNED_PREFIX}{version}"


def signed_version(output_set: str) -> int | None:
    """The version of a signed output set; None for the draft. Raises ValueError for anything else."""
    if output_set == DRAFT_OUTPUT:
        return None
    if output_set.startswith(_SIGNED_PREFIX) and output_set[len(_SIGNED_PREFIX):].isdigit():
        version = int(output_set[len(_SIGNED_PREFIX):])
        if version >= 1:
            return version
    raise ValueError(f"output set {output_set!r} must be {DRAFT_OUTPUT!r} or 'signed:<version>'")
