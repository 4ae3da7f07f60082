"""One typed settings object for every raddraft process.

Values come from (highest priority first) keyword overrides, ``RADDRAFT_*`` environment variables, an
optional TOML file (``--config``; keys are the field names, e.g. ``ae_title = "RADDRAFT"``) and the defaults
below. Everything is validated once at start-up; a bad value stops the process with a message naming it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash, <= 16 chars


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """Return *value* stripped, or raise ``ValueError`` saying which DICOM rule it breaks."""
    stripped = value.strip()
    if not stripped:
        raise ValueError(f"{what} must not be empty")
    if not _AE_TITLE_RE.match(stripped):
        raise ValueError(f"{what} {value!r} must be 1-16 printable ASCII characters without a backslash")
    return stripped


class PeerSpec(BaseModel):
    """An allowed calling peer: ``AETITLE@host`` (host may be a name, an address or a CIDR network)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str

    @classmethod
    def parse(cls, text: str) -> PeerSpec:
        if "@" not in text:
            raise ValueError(f"peer {text!r} must be written AETITLE@host")
        aet, host = text.rsplit("@", 1)
        if not host.strip():
            raise ValueError(f"peer {text!r} has no host after '@'")
        if len(host.split()) > 1:
            raise ValueError(f"peer {text!r}: host {host.strip()!r} must not contain spaces (separate peers with "
                             "commas)")
        return cls(ae_title=validate_ae_title(aet, f"AE title of peer {text!r}"), host=host.strip())

    def matches(self, ae_title: str, address: str) -> bool:
        """True if a calling AE title and peer IP address are this peer."""
        if ae_title.strip() != self.ae_title:
            return False
        return address in self.addresses()

    def addresses(self) -> _AddressMatcher:
        return _AddressMatcher(self.host)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}"


class _AddressMatcher:
    """Membership test of an IP address in a host name, an address or a network."""

    def __init__(self, host: str) -> None:
        self._host = host

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        try:
            return ip in ipaddress.ip_network(self._host, strict=False)
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self._host, None)
        except OSError:
            return False
        return any(ipaddress.ip_address(info[4][0]) == ip for info in infos)


class Destination(BaseModel):
    """A DICOM destination ``AETITLE@host:port``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)", text.strip())
        if not match:
            raise ValueError(f"DICOM destination {text!r} must be written AETITLE@host:port")
        return cls(
            ae_title=validate_ae_title(match["aet"], f"AE title of destination {text!r}"),
            host=match["host"].strip("[]"),
            port=int(match["port"]),
        )

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class HL7Destination(BaseModel):
    """An HL7 MLLP destination ``host:port``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> HL7Destination:
        match = re.fullmatch(r"(?P<host>[^:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)", text.strip())
        if not match:
            raise ValueError(f"HL7 destination {text!r} must be written host:port")
        return cls(host=match["host"].strip("[]"), port=int(match["port"]))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def normalize_dicomweb_url(text: str) -> str:
    """A DICOMweb (STOW-RS) base URL as destinations and delivery rows hold it: ``http(s)://host[:port]/path``
    without a trailing slash. Raises ``ValueError`` for another scheme, no host, credentials, a query or a
    fragment (credentials go in ``dicomweb_auth_file`` or ``dicomweb_bearer_token``, never in the URL list)."""
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"DICOMweb destination {_url_for_message(url)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"DICOMweb destination {_url_for_message(url)!r} must be written http(s)://host[:port]/path")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"DICOMweb destination {_url_for_message(url)!r} must not hold credentials: give them in "
                         "dicomweb_auth_file or dicomweb_bearer_token")
    if parts.query or parts.fragment:
        raise ValueError(f"DICOMweb destination {_url_for_message(url)!r} must have no query or fragment")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"DICOMweb destination {_url_for_message(url)!r}: port {port} out of range")
    return url


def _url_for_message(url: str) -> str:
    """*url* without whatever stands before an ``@`` of its authority (it may be a password), nor its query and
    fragment (they may hold a token)."""
    for mark in ("?", "#"):
        if mark in url:
            url = url.split(mark, 1)[0] + mark + "…"
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "…@" + authority.rsplit("@", 1)[1]
    return f"{scheme}{separator}{authority}{slash}{path}" if separator else ("…" if "@" in url else url)


class DicomWebAuth(BaseModel):
    """The credentials of one DICOMweb destination: HTTP basic (*username*, *secret* the password) or a bearer
    token (*secret*). The secret is a :class:`SecretStr`: masked in any repr, never logged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["basic", "bearer"]
    secret: SecretStr
    username: str | None = None

    def __str__(self) -> str:
        return f"basic {self.username}" if self.scheme == "basic" else "bearer"


def read_dicomweb_auth_file(path: Path) -> dict[str, DicomWebAuth]:
    """The credentials of a DICOMweb auth file, by normalized base URL: lines ``URL basic USER PASSWORD`` or
    ``URL bearer TOKEN``; blank lines and ``#`` comments are skipped. A bad line's message names its number
    (and the URL), never the secret."""
    credentials: dict[str, DicomWebAuth] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        words = text.split()
        try:
            url = normalize_dicomweb_url(words[0])
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from None
        scheme = words[1].lower() if len(words) > 1 else ""
        if scheme == "basic" and len(words) == 4:
            auth = DicomWebAuth(scheme="basic", username=words[2], secret=SecretStr(words[3]))
        elif scheme == "bearer" and len(words) == 3:
            auth = DicomWebAuth(scheme="bearer", secret=SecretStr(words[2]))
        else:
            raise ValueError(f"{path} line {number}: must be 'URL basic USER PASSWORD' or 'URL bearer TOKEN' "
                             f"(for {url})")
        if url in credentials:
            raise ValueError(f"{path} line {number}: {url} has credentials on an earlier line")
        credentials[url] = auth
    return credentials


_STOW_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STOW_TOKEN_MIN_LENGTH = 16


class StowSource(BaseModel):
    """A DICOMweb source allowed to STOW-RS to the gateway: its *name* (recorded as the instances' calling AE in the
    index, and logged) and its bearer *token* (a secret: never logged, masked in any repr of the settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    token: SecretStr

    @field_validator("name", mode="after")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _STOW_SOURCE_NAME_RE.match(value):
            raise ValueError(f"STOW-RS source name {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("token", mode="after")
    @classmethod
    def _check_token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        if len(token) < STOW_TOKEN_MIN_LENGTH or any(char.isspace() or char == "," for char in token):
            raise ValueError(f"a STOW-RS token must be at least {STOW_TOKEN_MIN_LENGTH} characters without spaces "
                             "or commas")
        return value

    @classmethod
    def parse(cls, text: str) -> StowSource:
        """``name:token`` (the token may hold ``:``); the message of a bad entry names the source, never the token."""
        name, separator, token = text.strip().partition(":")
        if not separator or not name.strip():
            raise ValueError("a STOW-RS source must be written name:token")
        return cls(name=name.strip(), token=SecretStr(token.strip()))

    def __str__(self) -> str:
        return self.name


def read_stow_tokens_file(path: Path) -> list[StowSource]:
    """The sources of a tokens file: one ``name token`` per line; blank lines and ``#`` comments are skipped. A bad
    line's message names its number (and the source), never the token."""
    sources: list[StowSource] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        words = text.split()
        if len(words) != 2:
            raise ValueError(f"{path} line {number}: must be 'name token' (two words)")
        try:
            sources.append(StowSource(name=words[0], token=SecretStr(words[1])))
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from None
    return sources


def _split_list(value: Any) -> Any:
    """Accept a list, or a string of items separated by commas and/or whitespace."""
    if isinstance(value, str):
        return [item for item in re.split(r"[,\s]+", value) if item]
    return value


def _split_ae_entries(value: Any) -> Any:
    """``AETITLE@…`` entries: a list, or a string of entries separated by commas or newlines, so that an AE title
    may contain spaces (``MY SCU@10.0.0.1, CT 1@ct.example``). A piece whose space-separated words all hold an
    ``@`` is several entries: the older space-separated form (``A@host1 B@host2``) still reads as before."""
    if not isinstance(value, str):
        return value
    entries: list[str] = []
    for piece in re.split(r"[,\n]", value):
        words = piece.split()
        if len(words) > 1 and all("@" in word for word in words):
            entries.extend(words)
        elif words:
            entries.append(piece.strip())
    return entries


def _checked_secrets_file(path: Path | None, read: Callable[[Path], object]) -> Path | None:
    """*path* after reading it once with *read*: a missing file or a bad line stops the process at start-up, not at
    the first request or delivery that needs it."""
    if path is not None:
        if not path.is_file():
            raise ValueError(f"file {path} does not exist")
        read(path)
    return path


UNIX_SOCKET_PATH_MAX = 107  # bytes of a unix socket's path (sun_path is 108 with its NUL)


class Settings(BaseSettings):
    """Every setting of raddraft, with its default. Environment: ``RADDRAFT_<FIELD>``."""

    # hide_input_in_errors: a refused value is not echoed in the message (it may hold a STOW-RS token or a broker
    # password); every message names the setting and the rule it breaks
    model_config = SettingsConfigDict(env_prefix="RADDRAFT_", extra="forbid", frozen=True, hide_input_in_errors=True)

    # --- storage --------------------------------------------------------------------------------------------
    home: Path = Field(Path("./var"), description="data directory: spool, index, broker, outbox")
    max_instance_mb: float = Field(1024.0, gt=0, description="largest accepted instance, MiB")
    min_free_disk_mb: float = Field(512.0, ge=0, description="refuse instances when free space falls below")

    # --- DICOM node -----------------------------------------------------------------------------------------
    ae_title: str = "RADDRAFT"
    dicom_bind: str = Field("0.0.0.0", description="address the DICOM port listens on")
    dicom_port: int = Field(11112, ge=0, le=65535)
    require_called_ae_title: bool = Field(True, description="reject associations not addressed to ae_title")
    allowed_peers: Annotated[list[PeerSpec], NoDecode] = Field(
        default_factory=list, description="AETITLE@host entries separated by commas (an AE title may contain "
        "spaces); empty accepts any peer"
    )
    tls_certificate: Path | None = Field(None, description="PEM server certificate: enables DICOM TLS")
    tls_private_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require and verify client certificates")
    max_associations: int = Field(16, ge=1)
    network_timeout_s: float = Field(60.0, gt=0)
    association_request_timeout_s: float = Field(
        5.0, gt=0, description="a connection must finish its TLS handshake, then send its whole A-ASSOCIATE-RQ, "
        "within this; otherwise it is closed")
    max_connections_per_address: int = Field(
        8, ge=1, description="more connections from one peer address are closed at accept")
    reserved_associations: int = Field(
        4, ge=0, description="with allowed_peers set: associations that addresses of no allowed peer cannot take")

    # --- study completeness and queue -----------------------------------------------------------------------
    study_idle_seconds: float = Field(10.0, gt=0)
    broker_url: str | None = Field(
        None, description="redis://… in production; empty = the embedded broker: a redis-server that raddraft serve "
        "starts and owns on a unix socket in home (append-only file, fsync always); sqla+sqlite:///FILE = kombu's "
        "polling SQLite transport with in-process workers (an explicit opt-in, slower)")
    handoff_retry_seconds: float = Field(2.0, gt=0, description="pause between hand-off attempts to the broker")
    task_max_retries: int = Field(8, ge=0, description="retries of a transient failure before the dead-letter table")
    max_decoded_mb: float = Field(
        256.0, gt=0, description="largest decode of pixel data, MiB (rows x columns x frames x samples x bytes, "
        "from the header): a larger image is not analysed and never decoded")
    decode_in_child: bool = Field(True, description="decode the picked slices in a child process with a memory "
                                  "limit, so that a decoder running out of memory cannot take the gateway down")
    decode_memory_mb: float = Field(3072.0, gt=0, description="what the decoding child may use beyond its "
                                    "start-up size, MiB")
    max_decode_interruptions: int = Field(
        2, ge=1, description="times decoding an episode's images may be interrupted by a dying worker (out of "
        "memory, killed) before the episode ends failed instead of taking the worker down again")
    inprocess_worker_max_restarts: int = Field(
        5, ge=0, description="serve: times in a row a dead in-process worker is restarted before it is left dead "
        "(/healthz 503, raddraft status says so); a worker up for a minute starts the count again")
    inprocess_worker_restart_backoff_s: float = Field(
        2.0, gt=0, description="serve: pause before the first restart of a dead in-process worker; doubles with "
        "each death in a row, at most 60 s")
    task_retry_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles with each retry")
    task_retry_backoff_max_s: float = Field(300.0, gt=0, description="longest delay between two retries")
    embedded_broker_aof_rewrite_min_mb: float = Field(
        1.0, gt=0, description="embedded broker: its append-only file is rewritten to what is queued and in flight "
        "once it is this large and has doubled since the last rewrite")
    broker_visibility_timeout_s: float = Field(
        3600.0, gt=0, description="redis: an unacknowledged task (its worker died) is re-delivered after this"
    )

    # --- delivery --------------------------------------------------------------------------------------------
    dicom_destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    hl7_destinations: Annotated[list[HL7Destination], NoDecode] = Field(default_factory=list)
    dicomweb_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="DICOMweb STOW-RS base URLs (https://pacs.example/dicom-web) separated by "
        "commas; the DICOM outputs are POSTed to <URL>/studies. No credentials here")
    dicomweb_auth_file: Path | None = Field(
        None, description="file of 'URL basic USER PASSWORD' or 'URL bearer TOKEN' lines: the credentials of "
        "each DICOMweb destination (secrets, never logged)")
    dicomweb_bearer_token: SecretStr | None = Field(
        None, description="bearer token sent to every DICOMweb destination that has no line in dicomweb_auth_file")
    dicomweb_ca_bundle: Path | None = Field(
        None, description="PEM CA bundle that verifies the DICOMweb destinations' certificates; empty = the "
        "system's (certifi's) CAs")
    dicomweb_insecure: bool = Field(
        False, description="true: do not verify the DICOMweb destinations' TLS certificates (logged as a warning "
        "at every delivery); never the default")
    hl7_sending_application: str = "RADDRAFT"
    hl7_sending_facility: str = "RADDRAFT"
    hl7_receiving_application: str = "RIS"
    hl7_receiving_facility: str = "HOSPITAL"
    hl7_without_accession: Literal["unsolicited", "skip"] = Field(
        "unsolicited", description="a study with no AccessionNumber: send an unsolicited ORU with a filler order "
        "number raddraft assigns (unsolicited), or send no ORU (skip); either way the DICOM outputs go")

    # --- HTTP (metrics, health, worklist) -------------------------------------------------------------------
    http_bind: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    database_url: str | None = Field(
        None, description="worklist database, e.g. postgresql://user@host/db; empty = SQLite file in home"
    )
    login_max_failures: int = Field(
        5, ge=1, description="failed sign-ins of one user within login_failure_window_s that lock the account "
        "until an admin unlocks it (raddraft user unlock NAME)")
    login_failure_window_s: float = Field(900.0, gt=0, description="window of login_max_failures")
    login_address_max_failures: int = Field(
        20, ge=1, description="failed sign-ins from one address within login_address_window_s after which its "
        "sign-ins are refused with HTTP 429 (no password checked) until the window has passed")
    login_address_window_s: float = Field(300.0, gt=0, description="window of login_address_max_failures")
    viewer_url_template: str | None = Field(
        None, description="the hospital's own viewer: an http(s) URL with {study_uid} (replaced by the URL-encoded "
        "Study Instance UID), e.g. https://pacs.example/viewer?StudyInstanceUIDs={study_uid}; the worklist links "
        "each study to it; empty = no link")

    # --- DICOMweb ingest (STOW-RS on the HTTP port, dicom_node/stow.py) ---------------------------------------
    stow_sources: Annotated[list[StowSource], NoDecode] = Field(
        default_factory=list, description="name:token entries separated by commas: the DICOMweb sources that may "
        "POST /dicomweb/studies with Authorization: Bearer <token>; none here nor in stow_tokens_file: the endpoint "
        "is off")
    stow_tokens_file: Path | None = Field(
        None, description="file of 'name token' lines (more sources; keeps the tokens out of the environment)")
    stow_max_request_mb: float | None = Field(
        None, gt=0, description="largest STOW-RS request body, MiB; empty = 4 x max_instance_mb")

    # --- model -----------------------------------------------------------------------------------------------
    model: str = Field("embedded", description="preset name or path to a model folder")
    inference_device: str = Field("auto", description="torch device of gpu workers: auto, cpu, cuda, cuda:1 …")
    inference_dtype: str = Field("auto", pattern=r"^(auto|float32|bfloat16|float16)$",
                                 description="weights of gpu workers: auto = bfloat16 on cuda, float32 on the cpu")
    inference_threads: int | None = Field(None, ge=1, description="torch CPU threads; empty = torch default")
    inference_batch_size: int = Field(4, ge=1, description="studies a gpu worker decodes at once: its continuous "
                                      "decoder's rows (4 a study) share one KV cache allocated once")
    model_socket: bool = Field(
        True, description="a gateway holding the model answers `raddraft analyze` on <home>/run/model.sock"
    )

    # --- the analysis gate (workers/gate.py): what the model reads; the rest ends "not-analysed" -------------
    analysis_modalities: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CR", "DX", "CT", "MR"], description="modalities the model reads")
    analysis_excluded_image_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["LOCALIZER"],
        description="an instance with one of these ImageType values is not read (LOCALIZER: CT topograms)")
    analysis_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="BodyPartExamined values the model reads; empty = any")

    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @model_validator(mode="after")
    def _check_reserve(self) -> Settings:
        if self.reserved_associations >= self.max_associations:
            raise ValueError(f"reserved_associations ({self.reserved_associations}) must be less than "
                             f"max_associations ({self.max_associations})")
        return self

    @model_validator(mode="after")
    def _check_stow_sources(self) -> Settings:
        names: set[str] = set()
        tokens: set[str] = set()
        for source in self.stow_credentials:
            if source.name in names:
                raise ValueError(f"STOW-RS source {source.name!r} is configured twice")
            token = source.token.get_secret_value()
            if token in tokens:
                raise ValueError(f"STOW-RS source {source.name!r} has the token of another source")
            names.add(source.name)
            tokens.add(token)
        return self

    @field_validator("stow_sources", mode="before")
    @classmethod
    def _parse_stow_sources(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [entry for entry in re.split(r"[,\n]", value) if entry.strip()]
        return [StowSource.parse(v) if isinstance(v, str) else v for v in value]

    @field_validator("stow_tokens_file", mode="after")
    @classmethod
    def _check_tokens_file(cls, value: Path | None) -> Path | None:
        return _checked_secrets_file(value, read_stow_tokens_file)

    @field_validator("ae_title", "hl7_sending_application", mode="after")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("viewer_url_template", mode="after")
    @classmethod
    def _check_viewer_url_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("viewer_url_template must be an http:// or https:// URL")
        if "{study_uid}" not in value:
            raise ValueError("viewer_url_template must contain {study_uid} (where the Study Instance UID goes)")
        try:
            value.format(study_uid="1.2.3")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"viewer_url_template may hold no placeholder but {{study_uid}}: {exc!r}") from None
        return value

    @field_validator("allowed_peers", mode="before")
    @classmethod
    def _parse_peers(cls, value: Any) -> Any:
        return [PeerSpec.parse(v) if isinstance(v, str) else v for v in _split_ae_entries(value)]

    @field_validator("dicom_destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        return [Destination.parse(v) if isinstance(v, str) else v for v in _split_ae_entries(value)]

    @field_validator("hl7_destinations", mode="before")
    @classmethod
    def _parse_hl7_destinations(cls, value: Any) -> Any:
        return [HL7Destination.parse(v) if isinstance(v, str) else v for v in _split_list(value)]

    @field_validator("dicomweb_destinations", mode="before")
    @classmethod
    def _parse_dicomweb_destinations(cls, value: Any) -> Any:
        urls = [normalize_dicomweb_url(str(v)) for v in _split_list(value)]
        if len(set(urls)) != len(urls):
            raise ValueError("a DICOMweb destination is listed twice")
        return urls

    @field_validator("dicomweb_auth_file", mode="after")
    @classmethod
    def _check_auth_file(cls, value: Path | None) -> Path | None:
        return _checked_secrets_file(value, read_dicomweb_auth_file)

    @field_validator("dicomweb_bearer_token", mode="after")
    @classmethod
    def _check_bearer_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(char.isspace() for char in value.get_secret_value()):
            raise ValueError("dicomweb_bearer_token must not contain spaces")
        return value

    @field_validator("analysis_modalities", "analysis_excluded_image_types", "analysis_body_parts", mode="before")
    @classmethod
    def _parse_words(cls, value: Any) -> Any:
        return [str(v).strip().upper() for v in _split_list(value) if str(v).strip()]

    @field_validator("tls_certificate", "tls_private_key", "tls_client_ca", "dicomweb_ca_bundle", mode="after")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @field_validator("broker_url", "database_url", "stow_tokens_file", "stow_max_request_mb", "dicomweb_auth_file",
                     "dicomweb_bearer_token", "dicomweb_ca_bundle", "viewer_url_template", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    # --- derived paths -------------------------------------------------------------------------------------
    @cached_property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @cached_property
    def index_path(self) -> Path:
        return self.home / "index.sqlite"

    @cached_property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def max_instance_bytes(self) -> int:
        """``max_instance_mb`` in bytes: the largest instance the node and the model socket take."""
        return int(self.max_instance_mb * 1024 * 1024)

    @cached_property
    def stow_credentials(self) -> list[StowSource]:
        """Every STOW-RS source: ``stow_sources``, then those of ``stow_tokens_file``; empty: the endpoint is off."""
        from_file = read_stow_tokens_file(self.stow_tokens_file) if self.stow_tokens_file is not None else []
        return [*self.stow_sources, *from_file]

    @cached_property
    def dicomweb_credentials(self) -> dict[str, DicomWebAuth]:
        """The credentials of ``dicomweb_auth_file`` by base URL (empty without the file)."""
        return read_dicomweb_auth_file(self.dicomweb_auth_file) if self.dicomweb_auth_file is not None else {}

    def dicomweb_auth(self, url: str) -> DicomWebAuth | None:
        """The credentials of DICOMweb destination *url*: its line in ``dicomweb_auth_file``, else
        ``dicomweb_bearer_token``, else None (no Authorization header)."""
        auth = self.dicomweb_credentials.get(normalize_dicomweb_url(url))
        if auth is None and self.dicomweb_bearer_token is not None:
            auth = DicomWebAuth(scheme="bearer", secret=self.dicomweb_bearer_token)
        return auth

    @property
    def stow_max_request_bytes(self) -> int:
        """The largest STOW-RS request body in bytes (``stow_max_request_mb``, by default 4 x max_instance_mb)."""
        megabytes = self.stow_max_request_mb if self.stow_max_request_mb is not None else 4 * self.max_instance_mb
        return int(megabytes * 1024 * 1024)

    @property
    def effective_broker_url(self) -> str:
        """The configured broker, or the embedded one: the redis-server ``raddraft serve`` owns, on the unix
        socket :attr:`embedded_broker_socket` (kombu's ``redis+socket://`` URL)."""
        if self.broker_url:
            return self.broker_url
        return f"redis+socket://{self.embedded_broker_socket}"

    @property
    def uses_embedded_broker(self) -> bool:
        """No ``broker_url``: ``raddraft serve`` starts and owns a redis-server in ``home`` (workers/owned_redis.py)."""
        return not self.broker_url

    @property
    def uses_sqlite_broker(self) -> bool:
        """``broker_url`` names kombu's SQLite transport: serve's workers run in its own process (no re-delivery)."""
        return bool(self.broker_url) and str(self.broker_url).startswith("sqla+sqlite:")

    @property
    def embedded_broker_dir(self) -> Path:
        """The owned redis-server's data folder: its config, append-only file, pid file and log."""
        return self.home / "broker"

    @property
    def embedded_broker_socket(self) -> Path:
        """The owned redis-server's unix socket (no TCP port) in a folder private to the user (0700):
        ``<home>/run/broker.sock``, or, where that path is longer than a unix socket's address allows (a home deep
        in the file system), ``<temp>/raddraft-<uid>/broker-<digest of the home>.sock``."""
        own = (self.home / "run" / "broker.sock").resolve()
        if len(os.fsencode(own)) <= UNIX_SOCKET_PATH_MAX:
            return own
        digest = hashlib.sha256(os.fsencode(self.home.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"raddraft-{os.getuid()}" / f"broker-{digest}.sock"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certificate is not None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings: overrides > environment > TOML file > defaults."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"settings file {config} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config is not None:
                sources += (TomlConfigSettingsSource(settings_cls),)
            return sources

    loaded = _FromFile(**overrides)
    if loaded.tls_certificate is not None and loaded.tls_private_key is None:
        raise ValueError("tls_private_key is required when tls_certificate is set")
    return Settings.model_validate(loaded.model_dump())
