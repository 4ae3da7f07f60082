"""The state enums that more than one package reads: an episode's (``state/store.py`` explains the life
cycle) and a delivery's. The state store keeps them; the pipeline, the metrics and the commands read them."""

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
    SKIPPED = "skipped"  # nothing of this kind was built for the episode (the reason is in last_error)
