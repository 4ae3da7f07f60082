"""The radiologist worklist as a WSGI application: login, worklist, study view, edits, questions and signing.

Every page except the login needs a session (cookie ``rd_session``: HttpOnly, SameSite=Strict, Secure over
TLS); every POST needs the session's CSRF token (``X-CSRF-Token`` header or ``csrf_token`` form field), the
login form a double-submit token. Views, edits, questions and signatures go to the audit table; the
application log names entries by id only, never a patient.
"""

from __future__ import annotations

import json
import logging
import mimetypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape

from core.manifest import SeriesEntry, StudyManifest
from core.result import AnalysisResult, DraftReport
from reporting.outputs import episode_problems
from worklist import auth, viewer_assets, wado
from worklist.bridge import Bridge, ModelUnavailableError
from worklist.correction import apply_correction
from worklist.delivery import signed_deliveries
from worklist.grounding import GroundedDraft, GroundedSentence, ground_draft, is_grounded, normalized, replace_sentence
from worklist.signing import SignConflictError, SignError
from worklist.storage import (
    MAX_PAGE,
    Decision,
    SessionInfo,
    Study,
    StudyClaimedError,
    StudyNotFoundError,
    StudyState,
)
from worklist.web import HTTPError, Request, Response, Router

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
SESSION_COOKIE = "rd_session"
LOGIN_CSRF_COOKIE = "rd_login_csrf"
SESSION_LIFETIME = timedelta(hours=12)
DEFAULT_REFRESH_MS = 5000
PAGE_SIZE = 100  # worklist entries per page unless ?limit= asks for another size (at most storage.MAX_PAGE)
MAX_TEXT = 20000
EDITABLE = (StudyState.DRAFT_READY, StudyState.IN_REVIEW)
# one answer for every refused sign-in (unknown user, wrong password, disabled or locked account): it does not
# tell which users exist (a locked user asks an administrator: raddraft user unlock NAME)
LOGIN_FAILED = "Wrong user name or password."


class OpsReply(Protocol):
    """What ``core.http.respond`` returns."""

    status: HTTPStatus
    content_type: str
    body: bytes


# (method, path, details) -> reply, for /healthz and /metrics; details: the request has an admin's session
OpsResponder = Callable[[str, str, bool], OpsReply]
OPS_PATHS = ("/healthz", "/metrics")


@dataclass(frozen=True)
class ImageRef:
    """One slice the viewer shows: an image-bearing instance, or one frame of a multi-frame one."""

    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int | None
    rows: int
    columns: int


class WorklistApp:
    """``WorklistApp(bridge)`` is a WSGI callable."""

    def __init__(self, bridge: Bridge, *, secure_cookies: bool = False, refresh_ms: int = DEFAULT_REFRESH_MS,
                 ops: OpsResponder | None = None) -> None:
        """*ops* answers ``/healthz`` and ``/metrics`` (``core.http.respond``) so one port serves both; its
        third argument says whether the request has an admin's session (``/healthz`` details)."""
        self.bridge = bridge
        self.ops = ops
        self.store = bridge.store
        self.secure_cookies = secure_cookies
        self.refresh_ms = refresh_ms
        self.templates = Environment(loader=FileSystemLoader(PACKAGE_DIR / "templates"),
                                     autoescape=select_autoescape(["html"]), auto_reload=False)
        self.router = Router()
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            ("GET", "/login", self.login_page), ("POST", "/login", self.login), ("POST", "/logout", self.logout),
            ("GET", "/", self.worklist_page), ("GET", "/api/studies", self.api_studies),
            ("GET", "/studies/{study_id}", self.study_page), ("GET", "/api/studies/{study_id}", self.api_study),
            ("GET", "/wado/studies/{study}/series/{series}/metadata", self.wado_metadata),
            ("GET", "/wado/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
             self.wado_frames),
            ("POST", "/api/studies/{study_id}/findings/{finding_id}", self.api_finding),
            ("POST", "/api/studies/{study_id}/sentences/{sentence_id}", self.api_sentence),
            ("POST", "/api/studies/{study_id}/report", self.api_report),
            ("POST", "/api/studies/{study_id}/correct", self.api_correct),
            ("POST", "/api/studies/{study_id}/ask", self.api_ask),
            ("POST", "/api/studies/{study_id}/sign", self.api_sign),
            ("POST", "/api/studies/{study_id}/amend", self.api_amend),
            ("POST", "/api/studies/{study_id}/take-over", self.api_take_over),
            ("GET", "/audit", self.audit_page),
            ("GET", "/static/{name}", self.static),
            ("GET", "/static/viewer/{name}", self.viewer_static),
        ]
        for method, pattern, handler in routes:
            self.router.add(method, pattern, handler)

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        try:
            if self.ops is not None and request.path in OPS_PATHS:
                reply = self.ops(request.method, request.path, self._is_admin(request))
                return Response(reply.body, HTTPStatus(reply.status), reply.content_type).wsgi(start_response)
            response = self.router.match(request)(request)
        except HTTPError as exc:
            response = self._error(request, exc.status, exc.message)
        except StudyNotFoundError as exc:
            response = self._error(request, HTTPStatus.NOT_FOUND, str(exc.args[0]))
        except StudyClaimedError as exc:  # another radiologist took the entry over between the check and the write
            response = self._error(request, HTTPStatus.CONFLICT, str(exc))
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.path)
            response = self._error(request, HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server log")
        return response.wsgi(start_response)

    def _error(self, request: Request, status: HTTPStatus, message: str) -> Response:
        if request.path.startswith(("/api/", "/wado/")):  # a script's request: the status itself, no redirect
            return Response.json({"error": message}, status)
        if status is HTTPStatus.UNAUTHORIZED:
            return Response.redirect("/login")
        return Response(self._render("error.html", status=status.value, message=message), status)

    def _render(self, template: str, **context: Any) -> bytes:
        return self.templates.get_template(template).render(**context).encode("utf-8")

    def _now(self) -> datetime:
        return self.bridge.clock()

    # ------------------------------------------------------------------ sessions and CSRF

    def _session(self, request: Request) -> SessionInfo:
        token = request.cookies.get(SESSION_COOKIE)
        session = self.store.get_session(auth.token_digest(token), self._now()) if token else None
        if session is None:
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "sign in first")
        return session

    def _is_admin(self, request: Request) -> bool:
        """The request carries an administrator's session (``/healthz`` then says what each check found)."""
        token = request.cookies.get(SESSION_COOKIE)
        session = self.store.get_session(auth.token_digest(token), self._now()) if token else None
        return session is not None and session.user.role == "admin"

    def _post_session(self, request: Request) -> SessionInfo:
        """The session of a POST, after the CSRF token and the Origin header are checked."""
        session = self._session(request)
        self._check_origin(request)
        given = request.header("X-CSRF-Token")
        if given is None and (request.header("content-type") or "").startswith("application/x-www-form-urlencoded"):
            given = request.form().get("csrf_token")
        if not auth.tokens_equal(given, session.csrf_token):
            raise HTTPError(HTTPStatus.FORBIDDEN, "CSRF token missing or wrong: reload the page")
        return session

    def _check_origin(self, request: Request) -> None:
        origin = request.header("Origin")
        if origin and origin != "null":
            host = request.header("Host") or ""
            if origin.split("://", 1)[-1] != host:
                raise HTTPError(HTTPStatus.FORBIDDEN, "cross-origin POST refused")

    def _secure(self, request: Request) -> bool:
        return self.secure_cookies or request.is_https

    # ------------------------------------------------------------------ login

    def login_page(self, request: Request, error: str = "", status: HTTPStatus = HTTPStatus.OK) -> Response:
        token = auth.new_token()
        response = Response(self._render("login.html", csrf_token=token, error=error), status)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, secure=self._secure(request), max_age=3600)
        return response

    def login(self, request: Request) -> Response:
        self._check_origin(request)
        form = request.form()
        if not auth.tokens_equal(form.get("csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE, "")) or \
                not request.cookies.get(LOGIN_CSRF_COOKIE):
            raise HTTPError(HTTPStatus.FORBIDDEN, "login form expired: reload the page")
        username, password = form.get("username", ""), form.get("password", "")
        settings = self.bridge.settings
        now, address = self._now(), request.remote_address
        address_window = timedelta(seconds=settings.login_address_window_s)
        retry_after = self.store.address_retry_after(address, now, limit=settings.login_address_max_failures,
                                                     window=address_window)
        if retry_after is not None:  # the password is not even checked
            response = self.login_page(request, f"Too many failed sign-ins from this address: try again in "
                                                f"{retry_after} s.", HTTPStatus.TOO_MANY_REQUESTS)
            response.headers.append(("Retry-After", str(retry_after)))
            return response
        user = self.store.get_user(username) if username else None
        # an unknown user costs the same scrypt as a wrong password: the time does not tell which users exist
        matches = auth.check_sign_in(password, user.password_hash if user else None)
        if user is None or not matches or user.disabled or user.locked:
            failure = self.store.record_login_failure(
                username[:64] or "-", address, now, user_limit=settings.login_max_failures,
                user_window=timedelta(seconds=settings.login_failure_window_s),
                address_limit=settings.login_address_max_failures, address_window=address_window)
            if failure.locked:
                logger.warning("worklist user %s locked after %d failed sign-ins (raddraft user unlock %s)",
                               username, settings.login_max_failures, username)
            if failure.throttled:
                logger.warning("sign-ins from %s refused for %g s after %d failures", address,
                               settings.login_address_window_s, settings.login_address_max_failures)
            return self.login_page(request, LOGIN_FAILED, HTTPStatus.UNAUTHORIZED)
        self.store.login_succeeded(user.id)
        token, csrf = auth.new_token(), auth.new_token()
        self.store.create_session(auth.token_digest(token), user.id, csrf, now, now + SESSION_LIFETIME)
        self.store.audit(user.username, "login", None, "", now)
        response = Response.redirect("/")
        response.set_cookie(SESSION_COOKIE, token, secure=self._secure(request),
                            max_age=int(SESSION_LIFETIME.total_seconds()))
        response.set_cookie(LOGIN_CSRF_COOKIE, "", secure=self._secure(request), max_age=0)
        return response

    def logout(self, request: Request) -> Response:
        session = self._post_session(request)
        token = request.cookies.get(SESSION_COOKIE, "")
        self.store.delete_session(auth.token_digest(token))
        self.store.audit(session.user.username, "logout", None, "", self._now())
        response = Response.redirect("/login")
        response.set_cookie(SESSION_COOKIE, "", secure=self._secure(request), max_age=0)
        return response

    # ------------------------------------------------------------------ worklist

    def worklist_page(self, request: Request) -> Response:
        session = self._session(request)
        self.store.audit(session.user.username, "view-worklist", None, "", self._now())
        return Response(self._render("worklist.html", user=session.user, csrf_token=session.csrf_token,
                                     refresh_ms=self.refresh_ms, states=[s.value for s in StudyState],
                                     viewer_links=self.bridge.settings.viewer_url_template is not None))

    def api_studies(self, request: Request) -> Response:
        self._session(request)
        states = [s for s in request.query_lists.get("state", []) if s]
        for state in states:
            if state not in {s.value for s in StudyState}:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"state {state!r} must be one of "
                                                        f"{', '.join(s.value for s in StudyState)}")
        limit = _query_int(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
        offset = _query_int(request, "offset", 0, 0, None)
        try:
            rows, more = self.store.studies_page(
                limit=limit, offset=offset, states=states, modality=request.query.get("modality") or None,
                priority=request.query.get("priority") or None, accession=request.query.get("accession") or None,
                sort=request.query.get("sort", "priority"), descending=request.query.get("order") == "desc")
        except ValueError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        latest = self.store.latest_change()
        return Response.json({"studies": [{**s.to_json(), "viewer_url": self._viewer_url(s.study_uid)} for s in rows],
                              "offset": offset, "limit": limit, "has_more": more,
                              "latest_change": latest.isoformat() if latest else None})

    # ------------------------------------------------------------------ study view

    def study_page(self, request: Request) -> Response:
        session = self._session(request)
        study = self.store.get_study(int(request.params["study_id"]))
        now = self._now()
        if study.state in EDITABLE and session.user.role == "radiologist":
            # a radiologist opening a draft claims it; one in review by someone else stays theirs (take-over)
            self.store.claim(study.id, session.user.username, now)
        self.store.audit(session.user.username, "view", study.id, f"state {study.state.value}", now)
        return Response(self._render("study.html", user=session.user, csrf_token=session.csrf_token,
                                     study_id=study.id))

    def api_study(self, request: Request) -> Response:
        session = self._session(request)
        study = self.store.get_study(int(request.params["study_id"]))
        return Response.json(self._study_document(study, session))

    def _study_document(self, study: Study, session: SessionInfo) -> dict[str, Any]:
        manifest = StudyManifest.read(Path(study.manifest_path))
        result = AnalysisResult.read(Path(study.result_path)) if study.result_path else None
        images = self._images(study)
        image_index = {(img.sop_instance_uid, img.frame_number): n for n, img in enumerate(images)}
        series = list(dict.fromkeys(img.series_instance_uid for img in images))
        entries = {s.series_instance_uid: s for s in manifest.series}
        reviews = self.store.finding_reviews(study.id)
        grounded = self._grounded(study, result)
        findings = []
        for index, finding in enumerate(result.findings if result else []):
            review = reviews.get(index)
            findings.append({
                "index": index, "label": review.label if review else finding.label, "model_label": finding.label,
                "decision": (review.decision if review else Decision.PENDING).value,
                "box": list(finding.box), "laterality": finding.laterality, "site": finding.site,
                "description": finding.description,
                "image": image_index.get((finding.sop_instance_uid, finding.frame_number)),
                "source": finding.source,
                "status": grounded.finding_status(index) if grounded else None,
                "sentences": grounded.finding_sentences.get(index, []) if grounded else [],
            })
        info = manifest.study
        versions = self.store.versions(study.id)
        deliveries = {version: [{"kind": row.kind, "destination": row.destination, "state": row.state.value,
                                 "attempts": row.attempts} for row in rows]
                      for version, rows in signed_deliveries(self.bridge.settings, study.study_uid,
                                                             study.episode_id).items()}
        radiologist = session.user.role == "radiologist"
        claimant = study.claimant
        others = claimant is not None and claimant != session.user.username
        editable = study.state in EDITABLE and not others
        return {
            **study.to_json(),
            "patient": {"name": info.patient_name, "id": info.patient_id, "sex": info.patient_sex,
                        "birth_date": info.patient_birth_date},
            "study_date": info.study_date,
            "report": {"findings": study.draft_findings, "impression": study.draft_impression},
            "grounded": grounded is not None,
            "sentences": [_sentence_json(s) for s in grounded.sentences] if grounded else [],
            "consistency": _consistency_json(grounded) if grounded else None,
            "findings": findings,
            "images": [{"index": n, "rows": img.rows, "columns": img.columns, "frame_number": img.frame_number,
                        "sop_instance_uid": img.sop_instance_uid, "series": series.index(img.series_instance_uid)}
                       for n, img in enumerate(images)],
            "series": [{"index": n, "series_instance_uid": uid, "modality": entries[uid].modality,
                        "number": entries[uid].series_number, "description": entries[uid].series_description,
                        "images": [i for i, img in enumerate(images) if img.series_instance_uid == uid]}
                       for n, uid in enumerate(series)],
            "wado_root": f"/wado/studies/{quote(study.study_uid, safe='')}",
            "viewer_url": self._viewer_url(study.study_uid),
            "versions": [{"version": v.version, "status": v.result_status, "signed_by": v.signed_by,
                          "signed_at": v.signed_at.isoformat(), "findings": v.findings, "impression": v.impression,
                          "deliveries": deliveries.get(v.version, [])} for v in versions],
            "model": {"name": result.model.name, "version": result.model.version} if result else None,
            "outputs_not_built": [f"{p.kind} {p.state}: {p.reason}" for p in episode_problems(
                self.bridge.settings.outbox_dir, study.study_uid, study.episode_id)],
            "editable": editable,
            "can_sign": editable and radiologist,
            "can_amend": study.state is StudyState.SIGNED and radiologist,
            "can_take_over": others and radiologist,
            "can_ask": self.bridge.model is not None and study.result_path is not None and radiologist,
            "preliminary": study.state is not StudyState.SIGNED,
        }

    def _grounded(self, study: Study, result: AnalysisResult | None) -> GroundedDraft | None:
        """The current draft's sentences linked to its findings; None for a draft written before grounding."""
        if result is None or not is_grounded(result.report):
            return None
        reviews = self.store.finding_reviews(study.id)
        accepted = {key for key, decision in self.store.sentence_reviews(study.id).items()
                    if decision is Decision.ACCEPTED}
        return ground_draft(result.report, result.findings, study.draft_findings, study.draft_impression,
                            rejected={i for i, r in reviews.items() if r.decision is Decision.REJECTED},
                            labels={i: r.label for i, r in reviews.items()}, accepted=accepted)

    def _images(self, study: Study) -> list[ImageRef]:
        """Every slice of the study: each image-bearing instance (each frame of a multi-frame one), series by series
        in the manifest's order, which is the slice order (position along the slice normal, else instance
        number; frames by their positions, else by number)."""
        manifest = StudyManifest.read(Path(study.manifest_path))
        refs: list[ImageRef] = []
        for series, instance in manifest.instances():
            if not instance.has_pixels:
                continue
            for frame in instance.frame_numbers() or [None]:
                refs.append(ImageRef(series.series_instance_uid, instance.sop_instance_uid, frame,
                                     instance.rows or 0, instance.columns or 0))
        return refs

    def _viewer_url(self, study_uid: str) -> str | None:
        template = self.bridge.settings.viewer_url_template
        return viewer_link(template, study_uid) if template else None

    # ------------------------------------------------------------------ WADO-RS (worklist/wado.py)

    def _wado_series(self, request: Request) -> SeriesEntry:
        """The series of a WADO-RS request, for a signed-in user, of a study that is a worklist entry."""
        self._session(request)
        study_uid = request.params["study"]
        study = self.store.latest_study(study_uid)
        if study is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"study {study_uid[:64]} is not on the worklist")
        manifest = StudyManifest.read(Path(study.manifest_path))
        try:
            return wado.find_series(manifest, request.params["series"])
        except wado.WadoNotFoundError as exc:
            raise HTTPError(HTTPStatus.NOT_FOUND, str(exc)) from None

    def wado_metadata(self, request: Request) -> Response:
        series = self._wado_series(request)
        try:
            body = wado.series_metadata(self.bridge.settings.spool_dir, series)
        except wado.WadoUnavailableError as exc:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        return Response(json.dumps(body).encode(), content_type="application/dicom+json")

    def wado_frames(self, request: Request) -> Response:
        series = self._wado_series(request)
        accept = request.header("Accept") or "*/*"
        if not any(kind in accept for kind in ("multipart/related", "*/*", "application/octet-stream")):
            raise HTTPError(HTTPStatus.NOT_ACCEPTABLE, 'frames are sent as multipart/related; '
                                                       'type="application/octet-stream" only')
        try:
            instance = wado.find_instance(series, request.params["instance"])
            reply = wado.frames(self.bridge.settings.spool_dir, instance, request.params["frames"])
        except wado.WadoNotFoundError as exc:
            raise HTTPError(HTTPStatus.NOT_FOUND, str(exc)) from None
        except wado.WadoBadRequestError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except wado.WadoUnavailableError as exc:
            logger.warning("WADO-RS frames cannot be sent: %s", exc)
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        return Response(reply.body, content_type=reply.content_type)

    # ------------------------------------------------------------------ edits

    def _editable_study(self, request: Request) -> tuple[SessionInfo, Study, dict[str, Any]]:
        session = self._post_session(request)
        body = request.json()
        study = self.store.get_study(int(request.params["study_id"]))
        if session.user.role != "radiologist":
            raise HTTPError(HTTPStatus.FORBIDDEN, f"role {session.user.role!r} cannot edit reports")
        if study.state not in EDITABLE:
            raise HTTPError(HTTPStatus.CONFLICT, f"entry {study.id} is {study.state.value}: it cannot be edited"
                            + ("; amend it to make a new version" if study.state is StudyState.SIGNED else ""))
        holder = self.store.claim(study.id, session.user.username, self._now())
        if holder is not None:
            raise HTTPError(HTTPStatus.CONFLICT, str(StudyClaimedError(study.id, holder)))
        return session, self.store.get_study(study.id), body

    def api_finding(self, request: Request) -> Response:
        session, study, body = self._editable_study(request)
        index = int(request.params["finding_id"])
        result = AnalysisResult.read(Path(study.result_path)) if study.result_path else None
        if result is None or not 0 <= index < len(result.findings):
            raise HTTPError(HTTPStatus.NOT_FOUND, f"finding {index} does not exist for entry {study.id}")
        try:
            decision = Decision(body.get("decision", ""))
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "decision must be 'accepted', 'rejected' or 'pending'") from None
        label = " ".join(str(body.get("label") or result.findings[index].label).split())
        if not 1 <= len(label) <= 128:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "label must be 1-128 characters")
        self.store.set_finding_review(study.id, index, decision, label=label, username=session.user.username,
                                      now=self._now(), claimant=session.user.username)
        relabel = f", label {label!r}" if label != result.findings[index].label else ""
        self.store.audit(session.user.username, f"finding-{decision.value}", study.id,
                         f"finding {index + 1}{relabel}", self._now())
        return Response.json({"index": index, "decision": decision.value, "label": label})

    def api_sentence(self, request: Request) -> Response:
        """Decide on one sentence of a grounded draft: ``accept`` it as stated, ``edit`` it (``text``: the new
        wording) or ``remove`` it. ``expect``: the sentence as the page showed it (a changed draft is refused)."""
        session, study, body = self._editable_study(request)
        number = int(request.params["sentence_id"])
        result = AnalysisResult.read(Path(study.result_path)) if study.result_path else None
        grounded = self._grounded(study, result)
        if grounded is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"entry {study.id} has no grounded draft: its sentences are not "
                                                  "reviewed one by one")
        if not 0 <= number < len(grounded.sentences):
            raise HTTPError(HTTPStatus.NOT_FOUND, f"sentence {number + 1} does not exist for entry {study.id}")
        sentence = grounded.sentences[number]
        expected = body.get("expect")
        if not isinstance(expected, str) or normalized(expected) != normalized(sentence.text):
            raise HTTPError(HTTPStatus.CONFLICT, f"sentence {number + 1} of entry {study.id} is no longer the one "
                                                 "shown (the draft changed): reload the page")
        action = body.get("action")
        username, now = session.user.username, self._now()
        if action == "accept":
            if sentence.status != "text_only":
                raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, f"sentence {number + 1} is {sentence.status}: only a "
                                "statement without image evidence (text_only) is accepted as stated")
            self.store.set_sentence_review(study.id, sentence.section, sentence.text, Decision.ACCEPTED,
                                           username=username, now=now, claimant=username)
        elif action in ("edit", "remove"):
            replacement = "" if action == "remove" else " ".join(_text(body, "text").split())
            if action == "edit" and not replacement:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "text must not be empty: remove the sentence instead")
            texts = {"findings": study.draft_findings, "impression": study.draft_impression}
            texts[sentence.section] = replace_sentence(texts[sentence.section], sentence.position, replacement)
            if len(texts[sentence.section]) > MAX_TEXT:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"{sentence.section} must be at most {MAX_TEXT} characters")
            self.store.save_draft_text(study.id, texts["findings"], texts["impression"], now, claimant=username)
        else:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "action must be 'accept', 'edit' or 'remove'")
        verb = {"accept": "accepted", "edit": "edited", "remove": "removed"}[action]
        self.store.audit(username, f"sentence-{verb}", study.id,
                         f"{sentence.section} sentence {sentence.position + 1} ({sentence.status})", now)
        return Response.json({"index": number, "action": action})

    def api_report(self, request: Request) -> Response:
        session, study, body = self._editable_study(request)
        findings, impression = _text(body, "findings"), _text(body, "impression")
        self.store.save_draft_text(study.id, findings, impression, self._now(), claimant=session.user.username)
        self.store.audit(session.user.username, "edit-report", study.id,
                         f"findings {len(findings)} chars, impression {len(impression)} chars", self._now())
        return Response.json({"findings": findings, "impression": impression})

    def api_correct(self, request: Request) -> Response:
        session, study, body = self._editable_study(request)
        current = DraftReport(findings=_text(body, "findings"), impression=_text(body, "impression"))
        try:
            corrected = apply_correction(current, _text(body, "request"))
        except ValueError as exc:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        report = corrected.report
        self.store.save_draft_text(study.id, report.findings, report.impression, self._now(),
                                   claimant=session.user.username)
        self.store.audit(session.user.username, "correct", study.id,
                         "; ".join(e.describe() for e in corrected.edits), self._now())
        return Response.json({"findings": report.findings, "impression": report.impression,
                              "edits": [e.describe() for e in corrected.edits],
                              "changed": corrected.changed_sentences})

    def api_ask(self, request: Request) -> Response:
        session = self._post_session(request)
        if session.user.role != "radiologist":
            raise HTTPError(HTTPStatus.FORBIDDEN, f"role {session.user.role!r} cannot ask the model")
        body = request.json()
        study = self.store.get_study(int(request.params["study_id"]))
        images = self._images(study)
        try:
            image = images[int(body.get("image", 0))]
        except (IndexError, ValueError, TypeError):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "image must be the index of one of the study's images") from None
        kind = body.get("kind")
        if kind not in ("vqa", "refer"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "kind must be 'vqa' or 'refer'")
        text = _text(body, "text")
        if not text.strip():
            raise HTTPError(HTTPStatus.BAD_REQUEST, "text must not be empty")
        try:
            answer = self.bridge.ask(study.id, image.sop_instance_uid, frame_number=image.frame_number, kind=kind,
                                     text=text, user=session.user)
        except ModelUnavailableError as exc:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        except ValueError as exc:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        return Response.json({**answer.to_json(), "image": images.index(image)})

    def api_sign(self, request: Request) -> Response:
        session, study, body = self._editable_study(request)
        if "findings" in body or "impression" in body:
            self.store.save_draft_text(study.id, _text(body, "findings"), _text(body, "impression"), self._now(),
                                       claimant=session.user.username)
        try:
            report, errors = self.bridge.sign(study.id, session.user)
        except SignConflictError as exc:
            raise HTTPError(HTTPStatus.CONFLICT, str(exc)) from None
        except SignError as exc:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        return Response.json({"version": report.version, "status": report.result_status.value,
                              "signed_by": report.signed_by, "delivery_errors": errors})

    def api_amend(self, request: Request) -> Response:
        session = self._post_session(request)
        study = self.store.get_study(int(request.params["study_id"]))
        if session.user.role != "radiologist":
            raise HTTPError(HTTPStatus.FORBIDDEN, f"role {session.user.role!r} cannot amend reports")
        versions = self.store.versions(study.id)
        now = self._now()
        if not versions or not self.store.set_state(study.id, StudyState.IN_REVIEW, now, expect=[StudyState.SIGNED],
                                                    claim_for=session.user.username):
            raise HTTPError(HTTPStatus.CONFLICT, f"entry {study.id} is {study.state.value}: only a signed report can "
                                                 "be amended")
        self.store.save_draft_text(study.id, versions[-1].findings, versions[-1].impression, now)
        self.store.audit(session.user.username, "amend-start", study.id, f"from version {versions[-1].version}", now)
        return Response.json({"state": StudyState.IN_REVIEW.value, "from_version": versions[-1].version})

    def api_take_over(self, request: Request) -> Response:
        """A radiologist explicitly takes over an entry another one is reading (audited ``take-over``)."""
        session = self._post_session(request)
        study = self.store.get_study(int(request.params["study_id"]))
        if session.user.role != "radiologist":
            raise HTTPError(HTTPStatus.FORBIDDEN, f"role {session.user.role!r} cannot take over reports")
        try:
            previous = self.store.take_over(study.id, session.user.username, self._now())
        except PermissionError as exc:
            raise HTTPError(HTTPStatus.CONFLICT, str(exc)) from None
        if previous not in (None, session.user.username):
            logger.info("worklist entry %d taken over by %s from %s", study.id, session.user.username, previous)
        return Response.json({"state": StudyState.IN_REVIEW.value, "claimed_by": session.user.username,
                              "previous": previous})

    # ------------------------------------------------------------------ audit and static files

    def audit_page(self, request: Request) -> Response:
        session = self._session(request)
        if session.user.role != "admin":
            raise HTTPError(HTTPStatus.FORBIDDEN, "the audit log is for administrators")
        entries = self.store.audit_entries(limit=500)
        return Response(self._render("audit.html", user=session.user, csrf_token=session.csrf_token,
                                     entries=entries))

    def static(self, request: Request) -> Response:
        name = request.params["name"]
        path = PACKAGE_DIR / "static" / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPError(HTTPStatus.NOT_FOUND, "no such file")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/javascript":
            content_type += "; charset=utf-8"
        return Response(path.read_bytes(), content_type=content_type)

    def viewer_static(self, request: Request) -> Response:
        """The built viewer (worklist/viewer_assets.py): 404 with how to build it when it is not there."""
        name = request.params["name"]
        path = viewer_assets.asset(name)
        if path is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"viewer file {name[:64]} is not built: run scripts/bootstrap.sh "
                                                  f"(it bundles Cornerstone3D into {viewer_assets.bundle_dir()})")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type in ("text/javascript", "application/javascript"):
            content_type += "; charset=utf-8"
        return Response(path.read_bytes(), content_type=content_type, cache=True)


def viewer_link(template: str, study_uid: str) -> str:
    """The hospital viewer's page of a study: *template* (``viewer_url_template``) with ``{study_uid}`` replaced by
    the URL-encoded Study Instance UID."""
    return template.replace("{study_uid}", quote(study_uid, safe=""))


def _query_int(request: Request, name: str, default: int, least: int, most: int | None) -> int:
    """A whole-number query parameter within [least, most]; 400 naming the rule otherwise."""
    raw = request.query.get(name)
    if raw in (None, ""):
        return default
    rule = f"a whole number from {least}" + (f" to {most}" if most is not None else "")
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name} {raw!r} must be {rule}") from None
    if value < least or (most is not None and value > most):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name} {value} must be {rule}")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be a string")
    if len(value) > MAX_TEXT:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be at most {MAX_TEXT} characters")
    return value.replace("\r\n", "\n").strip()


def _sentence_json(sentence: GroundedSentence) -> dict[str, Any]:
    return {"index": sentence.index, "section": sentence.section, "text": sentence.text,
            "polarity": sentence.polarity, "labels": list(sentence.labels), "laterality": sentence.laterality,
            "site": sentence.site, "findings": list(sentence.findings), "status": sentence.status,
            "position": sentence.position,
            "origin": sentence.origin, "accepted": sentence.accepted, "needs_decision": sentence.needs_decision}


def _consistency_json(grounded: GroundedDraft) -> dict[str, Any]:
    counts = grounded.consistency
    return {"grounded": counts.grounded, "text_only": counts.text_only, "box_only": counts.box_only,
            "flagged": counts.flagged, "undecided": len(grounded.undecided)}
