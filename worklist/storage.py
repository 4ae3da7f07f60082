"""The worklist database: users, sessions, studies, finding and sentence decisions, signed report versions, their
deliveries and the audit log.

SQLAlchemy Core on SQLite (default: ``<home>/worklist.sqlite``, WAL) or PostgreSQL (``RADDRAFT_DATABASE_URL``
``postgresql://…``, driven by psycopg 3). A signed report version is insert-only: a database trigger refuses
any UPDATE or DELETE of ``report_versions``, so the signed text cannot change even outside this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateColumn

from core.settings import Settings
from worklist.grounding import normalized, sentence_digest

logger = logging.getLogger(__name__)


class StudyState(StrEnum):
    DRAFT_READY = "draft ready"
    IN_REVIEW = "in review"
    SIGNED = "signed"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer episode of the same study has the current draft (kept for the record)


# the entries a newer episode of their study replaces on the worklist; a signed report stays signed
SUPERSEDABLE = (StudyState.DRAFT_READY, StudyState.IN_REVIEW, StudyState.FAILED)


class Priority(StrEnum):
    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"


PRIORITY_RANK = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}


class Decision(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


metadata = MetaData()

users = Table(
    "worklist_users", metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("full_name", String(320), nullable=False),  # DICOM PN, the verifying observer name
    Column("organization", String(64), nullable=False),
    Column("password_hash", String(256), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # failed sign-ins since failed_since (the window's start); locked_at set: no sign-in until an admin unlocks
    Column("failed_logins", Integer, nullable=False, default=0, server_default=text("0")),
    Column("failed_since", DateTime(timezone=True), nullable=True),
    Column("locked_at", DateTime(timezone=True), nullable=True),
)

# one row per failed sign-in, by remote address: the per-address throttle (rows older than its window are pruned)
login_failures = Table(
    "worklist_login_failures", metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_worklist_login_failures_address_at", "address", "at"),
)

sessions = Table(
    "worklist_sessions", metadata,
    Column("token_digest", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("worklist_users.id"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

studies = Table(
    "worklist_studies", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("episode_id", Integer, nullable=False),
    Column("manifest_path", Text, nullable=False),
    Column("result_path", Text, nullable=True),
    Column("state", String(16), nullable=False),
    Column("modality", String(32), nullable=False, default=""),
    Column("accession", String(64), nullable=False, default=""),
    Column("description", String(128), nullable=False, default=""),
    Column("age_years", Integer, nullable=True),
    Column("priority", String(8), nullable=False),
    Column("priority_rank", Integer, nullable=False),
    Column("draft_findings", Text, nullable=False, default=""),
    Column("draft_impression", Text, nullable=False, default=""),
    Column("error", Text, nullable=False, default=""),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # the radiologist reading an entry in review: only they edit and sign it until another one takes it over
    Column("claimed_by", String(64), nullable=True),
    # how far the AI draft's text and boxes disagree (AnalysisResult.consistency): statements without image
    # evidence and boxes not in the text; NULL for a draft written before grounding (or no draft)
    Column("ai_text_only", Integer, nullable=True),
    Column("ai_box_only", Integer, nullable=True),
    UniqueConstraint("study_uid", "episode_id", name="uq_worklist_study_episode"),
    # the worklist's page (a state filter, by priority then arrival) and its change poll read an index, not the
    # whole history of signed entries (issue 21, growth)
    Index("ix_worklist_studies_state_priority", "state", "priority_rank", "received_at", "id"),
    Index("ix_worklist_studies_updated_at", "updated_at"),
)

finding_reviews = Table(
    "worklist_finding_reviews", metadata,
    Column("study_id", Integer, ForeignKey("worklist_studies.id"), primary_key=True),
    Column("finding_index", Integer, primary_key=True),
    Column("decision", String(16), nullable=False),
    Column("label", String(128), nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# the radiologist's decision on one sentence of the draft, by its section and wording (a changed sentence is a
# new one): "accepted" as stated (worklist/grounding.py: an AI statement without image evidence needs one)
sentence_reviews = Table(
    "worklist_sentence_reviews", metadata,
    Column("study_id", Integer, ForeignKey("worklist_studies.id"), primary_key=True),
    Column("section", String(16), primary_key=True),
    Column("digest", String(64), primary_key=True),  # sha256 of section and normalized text
    Column("text", Text, nullable=False),
    Column("decision", String(16), nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

report_versions = Table(
    "worklist_report_versions", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", Integer, ForeignKey("worklist_studies.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("result_status", String(1), nullable=False),  # HL7 OBR-25: F first signature, C amendment
    Column("findings", Text, nullable=False),
    Column("impression", Text, nullable=False),
    Column("signed_by", String(64), nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
    Column("output_dir", Text, nullable=False),
    Column("sr_uid", String(64), nullable=False),
    Column("narrative_uid", String(64), nullable=False),
    UniqueConstraint("study_id", "version", name="uq_worklist_report_version"),
)

# one row per (signed version, destination): where signed deliveries were kept before the state store's
# ``deliveries`` had them (index.sqlite); read only to copy them there (worklist/delivery.py), never written
signed_deliveries = Table(
    "worklist_deliveries", metadata,
    Column("study_id", Integer, ForeignKey("worklist_studies.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("kind", String(8), primary_key=True),  # "dicom" (C-STORE) or "hl7" (MLLP); "dicomweb" never: it came later
    Column("destination", String(200), primary_key=True),
    Column("state", String(8), nullable=False),  # pending, done, dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("done_at", DateTime(timezone=True), nullable=True),
)

audit_log = Table(
    "worklist_audit", metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("username", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("study_id", Integer, nullable=True),
    Column("detail", Text, nullable=False, default=""),
)

_SQLITE_IMMUTABLE = [
    f"CREATE TRIGGER IF NOT EXISTS worklist_report_versions_no_{verb.lower()} BEFORE {verb} ON "
    f"worklist_report_versions BEGIN SELECT RAISE(ABORT, 'signed report versions are immutable: "
    f"{verb} is refused'); END"
    for verb in ("UPDATE", "DELETE")
]
_POSTGRES_IMMUTABLE = [
    "CREATE OR REPLACE FUNCTION worklist_refuse_change() RETURNS trigger AS $$ BEGIN "
    "RAISE EXCEPTION USING MESSAGE = 'signed report versions are immutable: ' || TG_OP || ' is refused'; END; "
    "$$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS worklist_report_versions_immutable ON worklist_report_versions",
    "CREATE TRIGGER worklist_report_versions_immutable BEFORE UPDATE OR DELETE ON worklist_report_versions "
    "FOR EACH ROW EXECUTE FUNCTION worklist_refuse_change()",
]


class UserExistsError(ValueError):
    """A user of that name is already registered."""


class StudyNotFoundError(KeyError):
    """No worklist entry has that id."""


class StudyClaimedError(PermissionError):
    """The entry is in review by another radiologist: it must be taken over first."""

    def __init__(self, study_id: int, claimant: str) -> None:
        super().__init__(f"worklist entry {study_id} is in review by {claimant}: take it over to edit or sign it")
        self.claimant = claimant


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    full_name: str
    organization: str
    password_hash: str
    disabled: bool
    locked: bool = False  # too many failed sign-ins: refused until an admin unlocks it


@dataclass(frozen=True)
class LoginFailure:
    """What one failed sign-in changed: *locked* the account (it reached the limit now), *throttled* the address
    (it reached its limit now)."""

    locked: bool
    throttled: bool


@dataclass(frozen=True)
class SessionInfo:
    user: User
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True)
class Study:
    id: int
    study_uid: str
    episode_id: int
    manifest_path: str
    result_path: str | None
    state: StudyState
    modality: str
    accession: str
    description: str
    age_years: int | None
    priority: Priority
    draft_findings: str
    draft_impression: str
    error: str
    received_at: datetime
    updated_at: datetime
    claimed_by: str | None = None
    ai_text_only: int | None = None  # the AI draft's statements without image evidence (None: not grounded)
    ai_box_only: int | None = None  # the AI draft's boxes no sentence states

    @property
    def claimant(self) -> str | None:
        """Who is reading the entry (only while it is in review)."""
        return self.claimed_by if self.state is StudyState.IN_REVIEW else None

    def to_json(self) -> dict[str, Any]:
        """The worklist row the browser sees (no patient name or ID)."""
        return {"id": self.id, "state": self.state.value, "modality": self.modality, "accession": self.accession,
                "description": self.description, "age_years": self.age_years, "priority": self.priority.value,
                "received_at": self.received_at.isoformat(), "updated_at": self.updated_at.isoformat(),
                "error": self.error, "claimed_by": self.claimant,
                "ai_disagreement": None if self.ai_text_only is None else {
                    "text_only": self.ai_text_only, "box_only": self.ai_box_only or 0}}


@dataclass(frozen=True)
class FindingReview:
    finding_index: int
    decision: Decision
    label: str
    updated_by: str


@dataclass(frozen=True)
class ReportVersion:
    study_id: int
    version: int
    result_status: str
    findings: str
    impression: str
    signed_by: str
    signed_at: datetime
    output_dir: str
    sr_uid: str
    narrative_uid: str


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    username: str
    action: str
    study_id: int | None
    detail: str


MAX_PAGE = 500  # entries in one page of the worklist

SORT_COLUMNS = {
    "received": studies.c.received_at,
    "priority": studies.c.priority_rank,
    "accession": studies.c.accession,
    "modality": studies.c.modality,
    "age": studies.c.age_years,
    "state": studies.c.state,
    "updated": studies.c.updated_at,
}


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL: ``settings.database_url`` (``postgresql://`` uses psycopg 3), else SQLite in home."""
    if not settings.database_url:
        return f"sqlite:///{(settings.home / 'worklist.sqlite').resolve()}"
    url = make_url(settings.database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"database_url {url.render_as_string(hide_password=True)!r} must be a sqlite:// or "
                         "postgresql:// URL")
    return url.render_as_string(hide_password=False)


def _utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes: everything is stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Store:
    """All reads and writes of the worklist tables; one transaction per method."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.backend = parsed.get_backend_name()
        if self.backend == "sqlite" and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        _add_missing_indexes(self.engine)
        with self.engine.begin() as conn:
            for statement in _SQLITE_IMMUTABLE if self.backend == "sqlite" else _POSTGRES_IMMUTABLE:
                conn.exec_driver_sql(statement)
        logger.debug("worklist database ready (%s)", self.backend)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(database_url(settings))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ------------------------------------------------------------------ users and sessions

    def add_user(self, username: str, role: str, password_hash: str, *, full_name: str, organization: str,
                 now: datetime) -> User:
        try:
            with self._tx() as conn:
                conn.execute(insert(users).values(username=username, role=role, full_name=full_name,
                                                  organization=organization, password_hash=password_hash,
                                                  disabled=False, created_at=now))
        except IntegrityError as exc:
            raise UserExistsError(f"user {username!r} already exists") from exc
        user = self.get_user(username)
        assert user is not None
        return user

    def set_password(self, username: str, password_hash: str) -> int:
        """Change a password and end every session of that user (a stolen cookie stops working); returns how
        many sessions ended."""
        with self._tx() as conn:
            user_id = conn.execute(select(users.c.id).where(users.c.username == username)).scalar()
            if user_id is None:
                raise KeyError(f"user {username!r} does not exist")
            conn.execute(update(users).where(users.c.id == user_id).values(password_hash=password_hash))
            return int(conn.execute(sql_delete(sessions).where(sessions.c.user_id == user_id)).rowcount)

    def record_login_failure(self, username: str, address: str, now: datetime, *, user_limit: int,
                             user_window: timedelta, address_limit: int, address_window: timedelta) -> LoginFailure:
        """Count a failed sign-in against *username* (if it exists) and *address*, with its audit entries, in one
        transaction: the account locks at *user_limit* failures within *user_window*; the address is throttled
        at *address_limit* failures within *address_window* (``address_retry_after``)."""
        with self._tx() as conn:
            self._insert_audit(conn, username, "login-failed", None, f"from {address}", now=now)
            fresh = users.c.failed_since.is_(None) | (users.c.failed_since <= now - user_window)
            conn.execute(update(users).where(users.c.username == username).values(
                failed_logins=case((fresh, 1), else_=users.c.failed_logins + 1),
                failed_since=case((fresh, now), else_=users.c.failed_since)))
            locked = bool(conn.execute(update(users).where(
                users.c.username == username, users.c.locked_at.is_(None), users.c.failed_logins >= user_limit,
            ).values(locked_at=now)).rowcount)
            if locked:
                self._insert_audit(conn, username, "login-locked", None,
                                   f"{user_limit} failed sign-ins within {user_window.total_seconds():g} s: "
                                   "locked until an administrator unlocks it", now=now)
            conn.execute(sql_delete(login_failures).where(login_failures.c.at <= now - address_window))
            conn.execute(insert(login_failures).values(address=address, at=now))
            count = conn.execute(select(func.count()).select_from(login_failures).where(
                login_failures.c.address == address)).scalar_one()
            throttled = count == address_limit
            if throttled:
                self._insert_audit(conn, username, "login-throttled", None,
                                   f"{count} failed sign-ins from {address} within "
                                   f"{address_window.total_seconds():g} s: further attempts refused (HTTP 429)",
                                   now=now)
        return LoginFailure(locked=locked, throttled=throttled)

    def address_retry_after(self, address: str, now: datetime, *, limit: int, window: timedelta) -> int | None:
        """Seconds until *address* may try to sign in again (it has *limit* failures within *window*), or None."""
        with self._tx() as conn:
            times = [_utc(at) for at in conn.execute(
                select(login_failures.c.at).where(login_failures.c.address == address,
                                                  login_failures.c.at > now - window)
                .order_by(login_failures.c.at.desc()).limit(limit)).scalars()]
        if len(times) < limit:
            return None
        return max(1, math.ceil((times[-1] + window - now).total_seconds()))

    def login_succeeded(self, user_id: int) -> None:
        with self._tx() as conn:
            conn.execute(update(users).where(users.c.id == user_id).values(failed_logins=0, failed_since=None))

    def unlock_user(self, username: str, by: str, now: datetime) -> bool:
        """Let a locked user sign in again (and forget their failed sign-ins), audited; False if not locked."""
        with self._tx() as conn:
            row = conn.execute(select(users.c.id, users.c.locked_at).where(users.c.username == username)).first()
            if row is None:
                raise KeyError(f"user {username!r} does not exist")
            conn.execute(update(users).where(users.c.id == row.id).values(
                locked_at=None, failed_logins=0, failed_since=None))
            detail = f"{username} unlocked" if row.locked_at is not None else f"{username} was not locked"
            self._insert_audit(conn, by, "unlock", None, detail, now=now)
        return row.locked_at is not None

    def get_user(self, username: str) -> User | None:
        with self._tx() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
        return _user(row) if row else None

    def list_users(self) -> list[User]:
        with self._tx() as conn:
            return [_user(row) for row in conn.execute(select(users).order_by(users.c.username)).mappings()]

    def create_session(self, digest: str, user_id: int, csrf_token: str, now: datetime, expires_at: datetime
                       ) -> None:
        with self._tx() as conn:
            conn.execute(sql_delete(sessions).where(sessions.c.expires_at < now))
            conn.execute(insert(sessions).values(token_digest=digest, user_id=user_id, csrf_token=csrf_token,
                                                 created_at=now, expires_at=expires_at))

    def get_session(self, digest: str, now: datetime) -> SessionInfo | None:
        with self._tx() as conn:
            row = conn.execute(
                select(sessions.c.csrf_token, sessions.c.expires_at, users)
                .join(users, users.c.id == sessions.c.user_id)
                .where(sessions.c.token_digest == digest)
            ).mappings().first()
        if row is None or _utc(row["expires_at"]) <= now or row["disabled"]:
            return None
        return SessionInfo(user=_user(row), csrf_token=row["csrf_token"], expires_at=_utc(row["expires_at"]))

    def delete_session(self, digest: str) -> None:
        with self._tx() as conn:
            conn.execute(sql_delete(sessions).where(sessions.c.token_digest == digest))

    # ------------------------------------------------------------------ studies

    def upsert_study(self, *, study_uid: str, episode_id: int, manifest_path: str, result_path: str | None,
                     state: StudyState, modality: str, accession: str, description: str, age_years: int | None,
                     priority: Priority, draft_findings: str, draft_impression: str, error: str, now: datetime,
                     ai_text_only: int | None = None, ai_box_only: int | None = None) -> tuple[int, bool]:
        """Insert the entry of a study episode, or refresh it while unsigned; (id, True if it changed).
        *ai_text_only*, *ai_box_only*: the draft's consistency counts (None: a draft written before grounding)."""
        values = dict(manifest_path=manifest_path, result_path=result_path, state=state.value, modality=modality,
                      accession=accession, description=description, age_years=age_years, priority=priority.value,
                      priority_rank=PRIORITY_RANK[priority], draft_findings=draft_findings,
                      draft_impression=draft_impression, error=error, updated_at=now, ai_text_only=ai_text_only,
                      ai_box_only=ai_box_only)
        with self._tx() as conn:
            row = conn.execute(select(studies.c.id, studies.c.state, studies.c.manifest_path,
                                      studies.c.result_path).where(
                studies.c.study_uid == study_uid, studies.c.episode_id == episode_id)).first()
            if row is None:
                newer = conn.execute(select(studies.c.episode_id).where(
                    studies.c.study_uid == study_uid, studies.c.episode_id > episode_id)).first()
                if newer is not None:  # a late registration of an older episode is superseded at once
                    values.update(state=StudyState.SUPERSEDED.value,
                                  error=f"superseded by episode {newer.episode_id} of the study")
                new_id = conn.execute(insert(studies).values(study_uid=study_uid, episode_id=episode_id,
                                                             received_at=now, **values)).inserted_primary_key
                if newer is None:
                    self._supersede_earlier(conn, study_uid, episode_id, now)
                return int(new_id[0]), True
            if row.state in (StudyState.SIGNED.value, StudyState.IN_REVIEW.value, StudyState.SUPERSEDED.value):
                # never overwrite a report a radiologist is reading or has signed, nor revive a superseded one
                return int(row.id), False
            if (row.manifest_path, row.result_path, row.state) == (manifest_path, result_path, state.value):
                return int(row.id), False  # the same draft registered again (a retried task)
            conn.execute(update(studies).where(studies.c.id == row.id).values(**values))
            conn.execute(sql_delete(finding_reviews).where(finding_reviews.c.study_id == row.id))
            conn.execute(sql_delete(sentence_reviews).where(sentence_reviews.c.study_id == row.id))
            return int(row.id), True

    def _supersede_earlier(self, conn: Connection, study_uid: str, episode_id: int, now: datetime) -> None:
        """One current draft per study: the unsigned entries of earlier episodes become superseded (their text
        and reviews are kept), each with an audit entry."""
        earlier = conn.execute(select(studies.c.id, studies.c.episode_id, studies.c.state).where(
            studies.c.study_uid == study_uid, studies.c.episode_id < episode_id,
            studies.c.state.in_([state.value for state in SUPERSEDABLE]))).all()
        for row in earlier:
            conn.execute(update(studies).where(studies.c.id == row.id).values(
                state=StudyState.SUPERSEDED.value, error=f"superseded by episode {episode_id} of the study",
                updated_at=now))
            self._insert_audit(conn, "raddraft", "supersede", int(row.id),
                               f"state {row.state} -> superseded: episode {episode_id} of the study arrived", now=now)

    def get_study(self, study_id: int) -> Study:
        with self._tx() as conn:
            row = conn.execute(select(studies).where(studies.c.id == study_id)).mappings().first()
        if row is None:
            raise StudyNotFoundError(f"worklist entry {study_id} does not exist")
        return _study(row)

    def find_study(self, study_uid: str, episode_id: int) -> Study | None:
        with self._tx() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid,
                                                     studies.c.episode_id == episode_id)).mappings().first()
        return _study(row) if row else None

    def latest_study(self, study_uid: str) -> Study | None:
        """The entry of the latest arrival episode of the study *study_uid*; None when the worklist has none."""
        with self._tx() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)
                               .order_by(studies.c.episode_id.desc()).limit(1)).mappings().first()
        return _study(row) if row else None

    def list_studies(self, *, states: list[str] | None = None, modality: str | None = None,
                     priority: str | None = None, accession: str | None = None, sort: str = "priority",
                     descending: bool = False, limit: int = MAX_PAGE, offset: int = 0) -> list[Study]:
        """At most *limit* entries from *offset* in the order asked for (:meth:`studies_page` for the page)."""
        if sort not in SORT_COLUMNS:
            raise ValueError(f"sort {sort!r} must be one of {', '.join(SORT_COLUMNS)}")
        query = select(studies)
        if states:
            query = query.where(studies.c.state.in_(states))
        if modality:
            query = query.where(studies.c.modality.contains(modality.upper(), autoescape=True))
        if priority:
            query = query.where(studies.c.priority == priority)
        if accession:
            query = query.where(studies.c.accession.contains(accession, autoescape=True))
        column = SORT_COLUMNS[sort]
        order = column.desc().nulls_last() if descending else column.asc().nulls_last()
        if not 1 <= limit <= MAX_PAGE + 1:
            raise ValueError(f"limit {limit} must be in 1..{MAX_PAGE + 1}")
        if offset < 0:
            raise ValueError(f"offset {offset} must not be negative")
        query = query.order_by(order, studies.c.received_at.asc(), studies.c.id.asc()).limit(limit).offset(offset)
        with self._tx() as conn:
            return [_study(row) for row in conn.execute(query).mappings()]

    def studies_page(self, *, limit: int, offset: int = 0, **filters: Any) -> tuple[list[Study], bool]:
        """One page of :meth:`list_studies` (*filters* are its keyword arguments) and whether more entries follow:
        one row more is read, the history is never counted."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit {limit} must be in 1..{MAX_PAGE}")
        rows = self.list_studies(limit=limit + 1, offset=offset, **filters)
        return rows[:limit], len(rows) > limit

    def latest_change(self) -> datetime | None:
        with self._tx() as conn:
            value = conn.execute(select(func.max(studies.c.updated_at))).scalar()
        return _utc(value) if value is not None else None

    def set_state(self, study_id: int, state: StudyState, now: datetime, *, expect: list[StudyState] | None = None,
                  error: str | None = None, claim_for: str | None = None, claimant: str | None = None) -> bool:
        """Move an entry to *state*; with *expect*, only from one of those states; with *claimant*, only if
        nobody else has claimed it; *claim_for*: who claims it now. True if it moved."""
        query = update(studies).where(studies.c.id == study_id)
        if expect:
            query = query.where(studies.c.state.in_([s.value for s in expect]))
        if claimant is not None:
            query = query.where(_free_for(claimant))
        values: dict[str, Any] = {"state": state.value, "updated_at": now}
        if error is not None:
            values["error"] = error
        if claim_for is not None:
            values["claimed_by"] = claim_for
        with self._tx() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    def claim(self, study_id: int, username: str, now: datetime) -> str | None:
        """*username* starts reading an editable entry: a draft becomes in review claimed by them (audited
        ``claim``). Returns None when they hold the claim, else the radiologist who does."""
        with self._tx() as conn:
            claimed = conn.execute(update(studies).where(
                studies.c.id == study_id,
                (studies.c.state == StudyState.DRAFT_READY.value)
                | ((studies.c.state == StudyState.IN_REVIEW.value) & studies.c.claimed_by.is_(None)),
            ).values(state=StudyState.IN_REVIEW.value, claimed_by=username, updated_at=now)).rowcount
            if claimed:
                self._insert_audit(conn, username, "claim", study_id, "in review", now=now)
                return None
            row = conn.execute(select(studies.c.state, studies.c.claimed_by)
                               .where(studies.c.id == study_id)).first()
        if row is None:
            raise StudyNotFoundError(f"worklist entry {study_id} does not exist")
        if row.state == StudyState.IN_REVIEW.value and row.claimed_by not in (None, username):
            return str(row.claimed_by)
        return None

    def take_over(self, study_id: int, username: str, now: datetime) -> str | None:
        """*username* takes over an entry in review (or claims a draft), audited ``take-over``; returns the
        previous claimant (None: there was none)."""
        with self._tx() as conn:
            row = conn.execute(select(studies.c.state, studies.c.claimed_by)
                               .where(studies.c.id == study_id)).first()
            if row is None:
                raise StudyNotFoundError(f"worklist entry {study_id} does not exist")
            if row.state not in (StudyState.DRAFT_READY.value, StudyState.IN_REVIEW.value):
                raise PermissionError(f"worklist entry {study_id} is {row.state}: only a draft or a report in review "
                                      "can be taken over")
            previous = row.claimed_by if row.state == StudyState.IN_REVIEW.value else None
            if previous == username:
                return previous
            conn.execute(update(studies).where(studies.c.id == study_id, studies.c.state == row.state).values(
                state=StudyState.IN_REVIEW.value, claimed_by=username, updated_at=now))
            self._insert_audit(conn, username, "take-over", study_id,
                               f"from {previous}" if previous else "unclaimed", now=now)
        return previous

    def save_draft_text(self, study_id: int, findings: str, impression: str, now: datetime, *,
                        claimant: str | None = None) -> None:
        """Store the draft text; with *claimant*, only while nobody else has claimed the entry."""
        query = update(studies).where(studies.c.id == study_id, studies.c.state.in_(
            [StudyState.DRAFT_READY.value, StudyState.IN_REVIEW.value]))
        if claimant is not None:
            query = query.where(_free_for(claimant))
        with self._tx() as conn:
            changed = conn.execute(query.values(draft_findings=findings, draft_impression=impression,
                                                updated_at=now)).rowcount
        if not changed:
            study = self.get_study(study_id)
            if study.claimant is not None and claimant is not None:
                raise StudyClaimedError(study_id, study.claimant)
            raise PermissionError(f"worklist entry {study_id} is signed or failed: its draft text cannot be edited; "
                                  "amend it to make a new version")

    @staticmethod
    def _check_reviewable(conn: Connection, study_id: int, claimant: str | None, what: str) -> None:
        """Refuse a review of *what* unless the entry is a draft or in review (by *claimant*, when given)."""
        row = conn.execute(select(studies.c.state, studies.c.claimed_by).where(studies.c.id == study_id)).first()
        state = row.state if row else None
        if state not in (StudyState.DRAFT_READY.value, StudyState.IN_REVIEW.value):
            raise PermissionError(f"worklist entry {study_id} is {state}: {what} can be reviewed only in a draft or "
                                  "a report under review")
        if claimant is not None and state == StudyState.IN_REVIEW.value and row.claimed_by not in (None, claimant):
            raise StudyClaimedError(study_id, str(row.claimed_by))

    def set_finding_review(self, study_id: int, index: int, decision: Decision, *, label: str, username: str,
                           now: datetime, claimant: str | None = None) -> None:
        with self._tx() as conn:
            self._check_reviewable(conn, study_id, claimant, "findings")
            conn.execute(sql_delete(finding_reviews).where(finding_reviews.c.study_id == study_id,
                                                           finding_reviews.c.finding_index == index))
            conn.execute(insert(finding_reviews).values(study_id=study_id, finding_index=index,
                                                        decision=decision.value, label=label, updated_by=username,
                                                        updated_at=now))
            conn.execute(update(studies).where(studies.c.id == study_id).values(updated_at=now))

    def finding_reviews(self, study_id: int) -> dict[int, FindingReview]:
        with self._tx() as conn:
            rows = conn.execute(select(finding_reviews).where(finding_reviews.c.study_id == study_id)).mappings()
            return {row["finding_index"]: FindingReview(row["finding_index"], Decision(row["decision"]),
                                                        row["label"], row["updated_by"]) for row in rows}

    def set_sentence_review(self, study_id: int, section: str, text: str, decision: Decision, *, username: str,
                            now: datetime, claimant: str | None = None) -> None:
        """Record the decision on the sentence *text* of *section* (``pending`` forgets it)."""
        digest, wording = sentence_digest(section, text), normalized(text)
        with self._tx() as conn:
            self._check_reviewable(conn, study_id, claimant, "sentences")
            conn.execute(sql_delete(sentence_reviews).where(sentence_reviews.c.study_id == study_id,
                                                            sentence_reviews.c.section == section,
                                                            sentence_reviews.c.digest == digest))
            if decision is not Decision.PENDING:
                conn.execute(insert(sentence_reviews).values(study_id=study_id, section=section, digest=digest,
                                                             text=wording, decision=decision.value,
                                                             updated_by=username, updated_at=now))
            conn.execute(update(studies).where(studies.c.id == study_id).values(updated_at=now))

    def sentence_reviews(self, study_id: int) -> dict[tuple[str, str], Decision]:
        """The sentence decisions of an entry by (section, normalized text)."""
        with self._tx() as conn:
            rows = conn.execute(select(sentence_reviews).where(sentence_reviews.c.study_id == study_id)).mappings()
            return {(row["section"], row["text"]): Decision(row["decision"]) for row in rows}

    # ------------------------------------------------------------------ signed versions

    def add_version(self, version: ReportVersion, now: datetime) -> None:
        """Record a signed version and mark the entry signed, in one transaction."""
        with self._tx() as conn:
            conn.execute(insert(report_versions).values(
                study_id=version.study_id, version=version.version, result_status=version.result_status,
                findings=version.findings, impression=version.impression, signed_by=version.signed_by,
                signed_at=version.signed_at, output_dir=version.output_dir, sr_uid=version.sr_uid,
                narrative_uid=version.narrative_uid))
            conn.execute(update(studies).where(studies.c.id == version.study_id).values(
                state=StudyState.SIGNED.value, updated_at=now))

    def versions(self, study_id: int) -> list[ReportVersion]:
        with self._tx() as conn:
            rows = conn.execute(select(report_versions).where(report_versions.c.study_id == study_id)
                                .order_by(report_versions.c.version)).mappings()
            return [ReportVersion(study_id=row["study_id"], version=row["version"],
                                  result_status=row["result_status"], findings=row["findings"],
                                  impression=row["impression"], signed_by=row["signed_by"],
                                  signed_at=_utc(row["signed_at"]), output_dir=row["output_dir"],
                                  sr_uid=row["sr_uid"], narrative_uid=row["narrative_uid"]) for row in rows]

    # ------------------------------------------------------------------ deliveries of signed versions (old table)

    def legacy_deliveries(self) -> list[dict[str, Any]]:
        """The rows of ``worklist_deliveries``, where signed deliveries were kept before the state store's
        ``deliveries`` had them (worklist/delivery.py copies them there at start-up); times in UTC."""
        with self._tx() as conn:
            rows = conn.execute(select(signed_deliveries).order_by(
                signed_deliveries.c.study_id, signed_deliveries.c.version, signed_deliveries.c.kind,
                signed_deliveries.c.destination)).mappings().all()
        return [{**row, "created_at": _utc(row["created_at"]),
                 "done_at": None if row["done_at"] is None else _utc(row["done_at"])} for row in rows]

    # ------------------------------------------------------------------ audit

    def audit(self, username: str, action: str, study_id: int | None, detail: str, now: datetime) -> None:
        with self._tx() as conn:
            self._insert_audit(conn, username, action, study_id, detail, now=now)

    @staticmethod
    def _insert_audit(conn: Connection, username: str, action: str, study_id: int | None, detail: str, *,
                      now: datetime) -> None:
        conn.execute(insert(audit_log).values(at=now, username=username, action=action, study_id=study_id,
                                              detail=detail))

    def audit_entries(self, study_id: int | None = None, limit: int = 1000) -> list[AuditEntry]:
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if study_id is not None:
            query = query.where(audit_log.c.study_id == study_id)
        with self._tx() as conn:
            return [AuditEntry(_utc(row["at"]), row["username"], row["action"], row["study_id"], row["detail"])
                    for row in conn.execute(query).mappings()]


def _free_for(username: str) -> Any:
    """The entry is not claimed by anyone else than *username* (a draft is nobody's)."""
    return (studies.c.state != StudyState.IN_REVIEW.value) | studies.c.claimed_by.is_(None) | (
        studies.c.claimed_by == username)


def _add_missing_columns(engine: Engine) -> None:
    """The migration of an existing database: ``create_all`` makes missing tables only, so add each column a
    table definition has and the database lacks (new columns are nullable or have a server default)."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    ddl = CreateColumn(column).compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
                    logger.info("worklist database: added column %s.%s", table.name, column.name)


def _add_missing_indexes(engine: Engine) -> None:
    """The indexes a table definition has and an existing database lacks (``create_all`` skips existing tables)."""
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(engine)
                logger.info("worklist database: added index %s", index.name)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _user(row: Any) -> User:
    return User(id=row["id"], username=row["username"], role=row["role"], full_name=row["full_name"],
                organization=row["organization"], password_hash=row["password_hash"], disabled=bool(row["disabled"]),
                locked=row["locked_at"] is not None)


def _study(row: Any) -> Study:
    return Study(
        id=row["id"], study_uid=row["study_uid"], episode_id=row["episode_id"], manifest_path=row["manifest_path"],
        result_path=row["result_path"], state=StudyState(row["state"]), modality=row["modality"],
        accession=row["accession"], description=row["description"], age_years=row["age_years"],
        priority=Priority(row["priority"]), draft_findings=row["draft_findings"],
        draft_impression=row["draft_impression"], error=row["error"], received_at=_utc(row["received_at"]),
        updated_at=_utc(row["updated_at"]), claimed_by=row["claimed_by"], ai_text_only=row["ai_text_only"],
        ai_box_only=row["ai_box_only"],
    )
