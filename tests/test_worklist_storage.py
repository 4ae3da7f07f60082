"""Worklist storage on both backends: users, sessions, entries, decisions, immutable signed versions, audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, inspect, text
from sqlalchemy.exc import DBAPIError
from worklist_helpers import database_url_fixture, settings_for, write_draft  # noqa: F401 - fixture

from core.manifest import StudyInfo
from worklist import auth
from worklist.bridge import Bridge, age_in_years
from worklist.storage import Decision, Priority, ReportVersion, Store, StudyState, UserExistsError

NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    yield s
    s.close()


def test_users_and_sessions(store):
    user = store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                          organization="Institut du Radium", now=NOW)
    assert user.role == "radiologist" and user.full_name == "Curie^Marie"
    with pytest.raises(UserExistsError, match="user 'curie' already exists"):
        store.add_user("curie", "admin", auth.hash_password("another-one"), full_name="x", organization="y", now=NOW)
    assert [u.username for u in store.list_users()] == ["curie"]
    token, csrf = auth.new_token(), auth.new_token()
    store.create_session(auth.token_digest(token), user.id, csrf, NOW, NOW + timedelta(hours=1))
    session = store.get_session(auth.token_digest(token), NOW + timedelta(minutes=5))
    assert session is not None and session.user.username == "curie" and session.csrf_token == csrf
    assert store.get_session(auth.token_digest(token), NOW + timedelta(hours=2)) is None  # expired
    assert store.get_session(auth.token_digest("forged"), NOW) is None
    store.delete_session(auth.token_digest(token))
    assert store.get_session(auth.token_digest(token), NOW) is None


def test_register_list_filter_sort_and_review(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    try:
        bridge = Bridge(settings, store, clock=lambda: NOW)
        first = write_draft(settings, accession="ACC-001")
        second = write_draft(settings, (5, 5), accession="ACC-002")
        a = bridge.register_draft(first.manifest_path, first.result_path)
        b = bridge.register_draft(second.manifest_path, second.result_path, Priority.STAT)
        assert bridge.register_draft(first.manifest_path, first.result_path) == a  # a retried task: same entry
        rows = store.list_studies()
        assert [r.id for r in rows] == [b, a]  # stat before routine
        assert [r.id for r in store.list_studies(sort="accession")] == [a, b]
        assert [r.id for r in store.list_studies(sort="accession", descending=True)] == [b, a]
        assert [r.id for r in store.list_studies(accession="002")] == [b]
        assert [r.id for r in store.list_studies(priority="routine")] == [a]
        assert store.list_studies(states=["signed"]) == []
        entry = store.get_study(a)
        assert entry.state is StudyState.DRAFT_READY and entry.modality == "CR" and entry.accession == "ACC-001"
        assert entry.draft_findings == first.result.report.findings
        with pytest.raises(ValueError, match="sort 'name' must be one of"):
            store.list_studies(sort="name")

        store.set_finding_review(a, 1, Decision.REJECTED, label="consolidation", username="curie", now=NOW)
        store.set_finding_review(a, 0, Decision.ACCEPTED, label="lung nodule", username="curie", now=NOW)
        reviews = store.finding_reviews(a)
        assert reviews[1].decision is Decision.REJECTED and reviews[0].label == "lung nodule"
        store.save_draft_text(a, "Edited findings.", "Edited impression.", NOW)
        assert store.get_study(a).draft_findings == "Edited findings."
        audit = store.audit_entries(a)
        assert [e.action for e in audit] == ["draft-registered"]
    finally:
        store.close()


def test_signed_versions_are_immutable_in_the_database(store):
    study_id, _ = store.upsert_study(
        study_uid="1.2.3", episode_id=1, manifest_path="/m.json", result_path="/r.json",
        state=StudyState.IN_REVIEW, modality="CR", accession="A1", description="", age_years=40,
        priority=Priority.ROUTINE, draft_findings="f", draft_impression="i", error="", now=NOW)
    store.add_version(ReportVersion(study_id=study_id, version=1, result_status="F", findings="Signed findings.",
                                    impression="Signed impression.", signed_by="curie", signed_at=NOW,
                                    output_dir="/out", sr_uid="1.2.3.4", narrative_uid="1.2.3.5"), NOW)
    assert store.get_study(study_id).state is StudyState.SIGNED
    with pytest.raises(PermissionError, match="signed or failed: its draft text cannot be edited"):
        store.save_draft_text(study_id, "sneaky", "change", NOW)
    with pytest.raises(PermissionError, match="findings can be reviewed only"):
        store.set_finding_review(study_id, 0, Decision.REJECTED, label="x", username="curie", now=NOW)
    for statement in ("UPDATE worklist_report_versions SET findings = 'changed'",
                      "DELETE FROM worklist_report_versions"):
        with pytest.raises(DBAPIError, match="signed report versions are immutable"), store.engine.begin() as conn:
            conn.execute(text(statement))
    assert store.versions(study_id)[0].findings == "Signed findings."
    # a re-registered draft never overwrites a signed entry
    _, changed = store.upsert_study(
        study_uid="1.2.3", episode_id=1, manifest_path="/m2.json", result_path="/r2.json",
        state=StudyState.DRAFT_READY, modality="CR", accession="A1", description="", age_years=40,
        priority=Priority.ROUTINE, draft_findings="new", draft_impression="new", error="", now=NOW)
    assert not changed and store.get_study(study_id).state is StudyState.SIGNED


def test_age_in_years():
    assert age_in_years(StudyInfo(patient_birth_date="19800502", study_date="20240501")) == 43
    assert age_in_years(StudyInfo(patient_birth_date="19800502", study_date="20240502")) == 44
    assert age_in_years(StudyInfo(patient_birth_date="", study_date="20240502")) is None
    assert age_in_years(StudyInfo(patient_birth_date="1980-05-02", study_date="20240502")) is None


def _entry(store: Store, episode_id: int, state: StudyState = StudyState.DRAFT_READY, study_uid: str = "1.2.3.9"
           ) -> int:
    entry_id, _ = store.upsert_study(
        study_uid=study_uid, episode_id=episode_id, manifest_path=f"/m/{episode_id}.json",
        result_path=f"/r/{episode_id}.json", state=state, modality="CR", accession="", description="",
        age_years=None, priority=Priority.ROUTINE, draft_findings="f", draft_impression="i", error="", now=NOW)
    return entry_id


def test_a_newer_episode_supersedes_the_unsigned_entries_of_its_study(store):
    """One current draft per study: before, each re-send of a study added another open draft to the worklist."""
    signed = _entry(store, 1)
    store.set_state(signed, StudyState.SIGNED, NOW)
    reading = _entry(store, 2)
    store.set_state(reading, StudyState.IN_REVIEW, NOW)
    other_study = _entry(store, 1, study_uid="1.2.3.10")
    current = _entry(store, 3)
    states = {entry: store.get_study(entry).state for entry in (signed, reading, other_study, current)}
    assert states == {signed: StudyState.SIGNED, reading: StudyState.SUPERSEDED, other_study: StudyState.DRAFT_READY,
                      current: StudyState.DRAFT_READY}
    assert store.get_study(reading).error == "superseded by episode 3 of the study"
    assert [e.action for e in store.audit_entries(reading)] == ["supersede"]
    assert _entry(store, 2) == reading and store.get_study(reading).state is StudyState.SUPERSEDED  # a retry
    late = _entry(store, 0)  # an older episode registered after the newer one: superseded at once
    assert store.get_study(late).state is StudyState.SUPERSEDED
    assert store.get_study(current).state is StudyState.DRAFT_READY
    open_entries = store.list_studies(states=[StudyState.DRAFT_READY.value, StudyState.IN_REVIEW.value])
    assert sorted(e.id for e in open_entries) == sorted([other_study, current])


def test_a_database_made_before_the_lockout_and_claim_columns_gets_them_when_opened(database_url):
    """An existing worklist database lacks the columns added since (create_all adds tables, not columns): opening
    it adds them, and its users and sessions keep working."""
    store = Store(database_url)
    user = store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                          organization="IR", now=NOW)
    with store.engine.begin() as conn:
        for column in ("failed_logins", "failed_since", "locked_at"):
            conn.execute(text(f"ALTER TABLE worklist_users DROP COLUMN {column}"))
        conn.execute(text("ALTER TABLE worklist_studies DROP COLUMN claimed_by"))
    store.close()
    store = Store(database_url)
    try:
        assert store.get_user("curie") == user
        failure = store.record_login_failure("curie", "127.0.0.1", NOW, user_limit=1, user_window=timedelta(60),
                                             address_limit=5, address_window=timedelta(60))
        assert failure.locked and store.get_user("curie").locked
        assert [c["name"] for c in inspect(store.engine).get_columns("worklist_studies")][-1] == "claimed_by"
    finally:
        store.close()


def _seed_history(store: Store, signed: int, drafts: int) -> None:
    """*signed* signed entries (the history) and *drafts* drafts waiting, inserted in bulk."""
    from worklist.storage import studies  # noqa: PLC0415 - the table itself, for a bulk insert

    rows = [dict(study_uid=f"1.2.3.{n}", episode_id=1, manifest_path="m", result_path=None,
                 state=(StudyState.SIGNED if n < signed else StudyState.DRAFT_READY).value, modality="CT",
                 accession=f"A{n}", description="", age_years=None, priority="routine", priority_rank=2,
                 draft_findings="", draft_impression="", error="", received_at=NOW + timedelta(seconds=n),
                 updated_at=NOW + timedelta(seconds=n)) for n in range(signed + drafts)]
    with store.engine.begin() as conn:
        conn.execute(studies.insert(), rows)


def test_the_worklist_page_and_its_poll_read_an_index_not_the_history(tmp_path):
    """Issue 21 (growth): with 10 000 signed entries in the database, the worklist's page of drafts and the
    change poll are index searches (SQLite's query plan of the statements the store runs), and the page is a
    page: a limit, an offset and whether more follow, never a count of the history."""
    store = Store(f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    try:
        _seed_history(store, signed=10_000, drafts=5)
        statements: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(store.engine, "before_cursor_execute", capture)
        waiting = [StudyState.DRAFT_READY.value, StudyState.IN_REVIEW.value]
        first, more = store.studies_page(limit=2, states=waiting)
        assert [s.accession for s in first] == ["A10000", "A10001"] and more
        last, more = store.studies_page(limit=2, offset=4, states=waiting)
        assert [s.accession for s in last] == ["A10004"] and not more
        assert store.latest_change() == NOW + timedelta(seconds=10_004)
        event.remove(store.engine, "before_cursor_execute", capture)
        with store.engine.connect() as conn:
            plans = [" | ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
                     for sql, params in statements]
        assert len(plans) == 3
        for plan in plans[:2]:
            assert "USING INDEX ix_worklist_studies_state_priority" in plan, plan
        assert "USING COVERING INDEX ix_worklist_studies_updated_at" in plans[2], plans[2]
        with pytest.raises(ValueError, match=r"limit 501 must be in 1\.\.500"):
            store.studies_page(limit=501)
    finally:
        store.close()


def test_an_existing_database_gets_the_new_indexes(tmp_path):
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    Store(url).close()
    old = Store(url)
    with old.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_worklist_studies_state_priority")
        conn.exec_driver_sql("DROP INDEX ix_worklist_studies_updated_at")
    old.close()
    reopened = Store(url)
    try:
        names = {index["name"] for index in inspect(reopened.engine).get_indexes("worklist_studies")}
        assert {"ix_worklist_studies_state_priority", "ix_worklist_studies_updated_at"} <= names
    finally:
        reopened.close()
