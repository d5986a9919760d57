"""DSNs in both libpq forms (``postgresql://`` URLs and ``key=value`` strings): parsing, the
form asyncpg accepts, and redaction for messages.

Parsing uses ``psycopg.conninfo.conninfo_to_dict`` (libpq's own ``PQconninfoParse``, the
authority on what a DSN means) when psycopg can be imported. ``psycopg.conninfo`` cannot be
imported on its own: importing it runs ``psycopg/__init__``, which loads libpq and raises
ImportError on a machine without it (psycopg is optional for asyncpg-only installs). So there
is also a pure-Python parser of the same grammar, used then; the tests check that both agree.

Error messages never contain a DSN's values: a libpq parse error quotes the offending token,
which may be (part of) a password (``invalid percent-encoded token: "hunter%2"``), so a DSN
that libpq refuses is described by the pure parser's messages, which name positions and
keywords only.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import quote, unquote, urlencode

from .errors import BatchloopError

log = logging.getLogger("batchloop")

_SCHEMES = ("postgresql://", "postgres://")

KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "requiressl",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslcertmode",
        "sslpassword",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
    ]
)
"""libpq's connection parameters (PostgreSQL 17)."""


class DsnError(BatchloopError, ValueError):
    """A DSN that is neither a valid URL nor a valid ``key=value`` string."""


def is_url(dsn: str) -> bool:
    return dsn.lstrip().startswith(_SCHEMES)


# ------------------------------------------------------------------------------ parsing


def parse(dsn: str) -> dict[str, str]:
    """The DSN's parameters, as libpq reads them (``host``/``port`` may be comma lists)."""
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # no libpq on this machine
        return parse_pure(dsn)
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        parse_pure(dsn)  # raises a DsnError that does not quote the DSN's values
        raise DsnError(
            "invalid DSN: libpq cannot parse it; give a postgresql:// URL or "
            "key=value pairs (see the libpq documentation, 'Connection Strings')"
        ) from None
    return {k: str(v) for k, v in parsed.items() if v is not None}


def parse_pure(dsn: str) -> dict[str, str]:
    """libpq's DSN grammar in Python (``conninfo_parse`` and ``conninfo_uri_parse``)."""
    params = _parse_url(dsn.strip()) if is_url(dsn) else _parse_pairs(dsn)
    for key in params:
        if key not in KEYWORDS:
            raise DsnError(f"invalid DSN: unknown connection parameter {_name(key)}")
    if "port" in params:
        for port in params["port"].split(","):
            if port and not port.strip().isdigit():
                raise DsnError("invalid DSN: the port must be a number")
    return params


def _name(key: str) -> str:
    # A keyword is quoted back only when it looks like one: a misplaced password would not.
    return repr(key) if re.fullmatch(r"[a-z_]{1,40}", key) else "(not shown)"


def _parse_pairs(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise DsnError(
                f'invalid DSN: missing "=" after {_name(key)}; give a postgresql:// URL or '
                "key=value pairs such as 'host=localhost dbname=app'"
            )
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise DsnError(f"invalid DSN: unterminated quoted value of {_name(key)}")
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    value.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
        params[key] = "".join(value)


def _decode(part: str, what: str) -> str:
    if re.search(r"%(?![0-9A-Fa-f]{2})", part):
        raise DsnError(f"invalid DSN: bad percent-encoding in the URL's {what}")
    return unquote(part, errors="strict")


def _parse_url(url: str) -> dict[str, str]:
    params: dict[str, str] = {}
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, colon, password = auth.partition(":")
        if user:
            params["user"] = _decode(user, "user name")
        if colon:
            params["password"] = _decode(password, "password")
    hosts: list[str] = []
    ports: list[str] = []
    if netloc:
        for spec in netloc.split(","):
            if spec.startswith("["):
                addr, bracket, tail = spec[1:].partition("]")
                if not bracket or (tail and not tail.startswith(":")):
                    raise DsnError("invalid DSN: bad IPv6 address in the URL")
                port = tail[1:]
            else:
                addr, _, port = spec.partition(":")
            hosts.append(_decode(addr, "host"))
            ports.append(_decode(port, "port"))
        if any(hosts):
            params["host"] = ",".join(hosts)
        if any(ports):
            params["port"] = ",".join(ports)
    if slash and path:
        params["dbname"] = _decode(path, "database name")
    if query:
        for field in query.split("&"):
            key, eq, value = field.partition("=")
            if not eq:
                raise DsnError(f'invalid DSN: missing "=" in the URL parameter {_name(key)}')
            key, value = _decode(key, "parameters"), _decode(value, "parameters")
            if key == "ssl" and value == "true":  # libpq's JDBC-compatible spelling
                key, value = "sslmode", "require"
            params[key] = value
    return params


# ------------------------------------------------------------------------------ display


def redact(dsn: str | None) -> str:
    """The DSN for a message, its password (in any form) replaced by ``***``."""
    if not dsn:
        return "the default (PG* environment) server"
    try:
        params = parse(dsn)
    except DsnError:
        return "an invalid DSN"
    if "password" in params:
        params["password"] = "***"
    if is_url(dsn):
        return _display_url(params)
    return " ".join(f"{k}={_quote_value(v)}" for k, v in params.items())


def _quote_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _display_url(params: dict[str, str]) -> str:
    rest = dict(params)
    auth = ""
    if "user" in rest:
        auth = quote(rest.pop("user"), safe="")
        if "password" in rest:
            auth += ":" + rest.pop("password")
        auth += "@"
    netloc = ""
    host = rest.get("host", "")
    if host and not any(h.startswith("/") for h in host.split(",")):
        hosts = rest.pop("host").split(",")
        ports = rest.pop("port", "").split(",") if "port" in rest else []
        specs = []
        for i, h in enumerate(hosts):
            spec = f"[{h}]" if ":" in h else h
            port = ports[i] if i < len(ports) else (ports[0] if len(ports) == 1 else "")
            specs.append(f"{spec}:{port}" if port else spec)
        netloc = ",".join(specs)
    path = "/" + quote(rest.pop("dbname"), safe="") if "dbname" in rest else ""
    query = ("?" + urlencode(rest, safe="/*")) if rest else ""
    return f"postgresql://{auth}{netloc}{path}{query}"


def scrub(text: str, *dsns: str | None) -> str:
    """``text`` with the password of any of ``dsns`` replaced by ``***``: a last guard for
    messages that come from elsewhere (a driver's exception text)."""
    for dsn in dsns:
        if not dsn:
            continue
        try:
            password = parse(dsn).get("password")
        except DsnError:
            continue
        if password:
            text = text.replace(password, "***")
            if quote(password, safe="") != password:
                text = text.replace(quote(password, safe=""), "***")
    return text


# ------------------------------------------------------------------------------ asyncpg

_ASYNCPG_SAME = (
    "user",
    "password",
    "dbname",
    "passfile",
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
    "service",
    "application_name",
    "options",  # a startup parameter: the server itself reads "-c name=value" from it
)
_CLIENT_TUNING = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslcompression",
    "sslsni",
    "load_balance_hosts",
)
"""libpq client settings asyncpg has no option for and that only tune the connection (the
host sets TCP keepalives itself): ignored, as the connection works the same without them."""


def for_asyncpg(dsn: str | None) -> tuple[str | None, dict[str, Any]]:
    """``dsn`` in a form asyncpg accepts: a URL, plus ``asyncpg.connect`` keyword arguments
    for what a URL cannot say to asyncpg (``connect_timeout``). asyncpg only parses URLs, and
    sends unknown URL parameters to the server as settings, so a URL is rebuilt from libpq's
    reading of the DSN, whichever form it was given in. Raises DsnError (a ValueError) for a
    DSN that cannot be parsed or asks for what asyncpg cannot do."""
    if dsn is None or not dsn.strip():
        return None, {}
    params = parse(dsn)
    query: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key in _ASYNCPG_SAME:
            query[key] = value
        elif key == "fallback_application_name":
            query.setdefault("application_name", value)
        elif key == "connect_timeout":
            try:
                seconds = float(value) if value.strip() else 0.0
            except ValueError:
                raise DsnError("invalid DSN: connect_timeout must be a number") from None
            if seconds > 0:
                kwargs["timeout"] = max(2.0, seconds)  # libpq too counts at least 2 s
        elif key == "client_encoding":
            if value.lower().replace("-", "") not in ("utf8", "unicode"):
                raise DsnError("invalid DSN for asyncpg: client_encoding must be UTF8")
        elif key == "requiressl":
            if value == "1":
                query.setdefault("sslmode", "require")
        elif key in _CLIENT_TUNING:
            log.debug("DSN parameter %s has no asyncpg equivalent; ignored", key)
        elif key in ("host", "hostaddr", "port"):
            pass
        else:
            raise DsnError(
                f"DSN parameter {key!r} is not supported by asyncpg: remove it, or use "
                "driver='psycopg'"
            )
    # hostaddr is the address libpq actually connects to (host then only names it).
    hosts = params.get("hostaddr") or params.get("host")
    if hosts:
        query["host"] = ",".join(
            f"[{h}]" if ":" in h and not h.startswith(("/", "[")) else h for h in hosts.split(",")
        )
    if "port" in params:
        default = os.environ.get("PGPORT") or "5432"
        query["port"] = ",".join(p.strip() or default for p in params["port"].split(","))
    # asyncpg reads each of these from the query string; an empty value means "unset" to libpq
    # and would be refused by asyncpg's strict query parsing.
    query = {k: v for k, v in query.items() if v != ""}
    return "postgresql://" + ("?" + urlencode(query) if query else ""), kwargs


__all__ = ["DsnError", "for_asyncpg", "is_url", "parse", "parse_pure", "redact", "scrub"]
