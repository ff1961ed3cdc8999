"""Settings: every option of towerws, where it comes from, and its validation.

Each option is one field of :class:`Settings`; the field's metadata carries the
parser and the help line, so the command line, the environment, the config file,
``etc/towerws.conf`` and the table in ``docs/configuration.md`` all derive from this one list.

Precedence: command line > ``TOWERWS_<KEY>`` environment > config file
(INI, section ``[towerws]``) > default.  :func:`load` validates everything once
and returns an immutable :class:`Settings`; a bad value raises
:class:`ConfigError` whose message names the option (or file) and the problem.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from towerws.auth import DEFAULT_OBJECT_PATHS, ObjectPaths, TokenFile, tower_url
from towerws.auth import allowed_origins as parse_origins
from towerws.broker_urls import DEFAULT_AMQP_URL, Brokers, brokers, brokers_or_none
from towerws.messages import MAX_SHORTSTR_BYTES, check_name
from towerws.subscribe import Allowlist

ENV_PREFIX = "TOWERWS_"
MIN_SECRET_LENGTH = 16
SECTION = "towerws"


#: longest ConfigError message: an echoed value can be any size, the operator reads one line
MAX_MESSAGE = 500


class ConfigError(ValueError):
    """An option or file is invalid; the message is one line for the operator.

    Messages echo what the operator gave (a path, an endpoint description), which
    can hold newlines, NUL bytes or megabytes: control characters are escaped and
    the line is cut, so twistd prints exactly one readable line.
    """

    def __init__(self, message: str):
        line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
        if len(line) > MAX_MESSAGE:
            line = line[:MAX_MESSAGE] + f"... ({len(line) - MAX_MESSAGE} more characters)"
        super().__init__(line)


# -- value parsers: str -> value, raising ValueError with a short reason --------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a non-negative number of seconds")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _strports(text: str) -> str:
    from twisted.internet import endpoints, reactor

    # Parsing builds the endpoint object without listening: syntax errors and
    # unknown endpoint types surface here, not later at start-up.
    try:
        endpoints.serverFromString(reactor, text)
    except (ValueError, OSError):
        raise
    except Exception as exc:
        # Each endpoint type parses its own arguments with errors of its own
        # (ssl: loads its certificate and key now; a bad one raises pyOpenSSL's
        # Error): any of them means the description is unusable.
        raise ValueError(f"invalid endpoint description ({type(exc).__name__}: {exc})") from None
    return text


def _optional_strports(text: str) -> str | None:
    return _strports(text) if text.strip() else None


def _one_of(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError("must be " + " or ".join(allowed))
        return text

    return parse


def _exchange_name(text: str) -> str:
    """An exchange name: an AMQP short string without whitespace."""
    return check_name(text, "the exchange name")


#: the node's queue is QUEUE_PREFIX + node id: both together are one AMQP name
QUEUE_PREFIX = "towerws."


def _node_id(text: str) -> str:
    return check_name(text, "the node id", MAX_SHORTSTR_BYTES - len(QUEUE_PREFIX))


# PEM file options: cryptography is loaded only when one of them is used.
def _pem_certificates(text: str) -> str:
    from towerws import pem

    return pem.check_ca_file(text)


def _pem_key(text: str) -> str:
    from towerws import pem

    return pem.check_key_file(text)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class SecretFile:
    """A loaded ``--publish-secret-file``: its first line, surrounding whitespace removed.

    Neither ``repr`` nor any error message shows the secret.
    """

    path: str
    secret: bytes = field(repr=False)

    @classmethod
    def load(cls, path: str) -> "SecretFile":
        try:
            with open(path, "rb") as fp:
                raw = fp.read(4096)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        lines = raw.strip().splitlines()
        secret = lines[0].strip() if lines else b""
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"{path}: the secret must be at least {MIN_SECRET_LENGTH} characters long")
        return cls(path=path, secret=secret)

    def __str__(self) -> str:
        return self.path


def default_node_id() -> str:
    # Hostname alone is not unique when two nodes share a host (or a pod name is
    # reused); the suffix keeps queue names apart.
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


def option(default: Any, parse: Callable[[str], Any], help: str, shown: str | None = None,
           brief: str | None = None) -> Any:
    """A settings field: its default, how to parse a string, one line of help.

    ``shown``: the default as written in the docs' table and ``etc/towerws.conf``
    (when ``str(default)`` is not how an operator writes it); ``brief``: a short
    description of a default too long for a ``--help`` column.
    """
    return field(default=default, metadata={"parse": parse, "help": help, "shown": shown, "brief": brief})


def flag(help: str) -> Any:
    """An off-by-default switch: ``--name`` on the command line, ``true``/``false`` elsewhere."""
    return field(default=False, metadata={"parse": _flag, "help": help, "shown": "false", "flag": True})


DEFAULT_GROUPS = (
    "jobs:status_changed,summary schedules:changed inventories:status_changed "
    "control:limit_reached_<user> job_events:<id> ad_hoc_command_events:<id> "
    "workflow_events:<id> project_update_events:<id> inventory_update_events:<id> "
    "system_job_events:<id>"
)


@dataclass(frozen=True)
class Settings:
    listen: str = option("tcp:8051", _strports, "where websocket clients connect (Twisted strports description)")
    amqp_url: Brokers | None = option(
        brokers(DEFAULT_AMQP_URL),
        brokers_or_none,
        "RabbitMQ URL, amqp:// or amqps:// (vhost URL-encoded), or a comma-separated list of them, one per "
        "cluster node; none: single node, in-process bus, no RabbitMQ",
        shown=DEFAULT_AMQP_URL,
    )
    exchange: str = option("towerws", _exchange_name, "exchange publishers send to (declared durable at start)")
    exchange_type: str = option(
        "direct", _one_of("direct", "topic"),
        "direct (routing key = group name, RabbitMQ's cheapest routing) or topic (lets other consumers bind patterns)",
    )
    tokens_file: TokenFile | None = option(
        None, TokenFile.load, "JSON file of static development tokens: {\"token\": {\"id\": 7, ...}}"
    )
    node_id: str = option(None, _node_id, "this node's id; its queue is towerws.<node-id>", shown="hostname-<random>")
    groups: Allowlist = option(
        Allowlist.parse(DEFAULT_GROUPS),
        Allowlist.parse,
        "subscribable groups: KEY:ITEM,... entries; <id> = any positive id, <user> = own user id",
        shown=DEFAULT_GROUPS,
        brief="AWX's groups: jobs, schedules, inventories, control and six *_events keys",
    )
    max_message_size: int = option(65536, _positive_int, "largest client message in bytes (larger: close 1009)")
    ping_interval: float = option(30.0, _non_negative_float, "seconds between server pings to each client (0: off)")
    ping_timeout: float = option(10.0, _positive_float, "seconds a client has to answer a ping before it is dropped")
    open_handshake_timeout: float = option(10.0, _positive_float, "seconds a client has to complete the opening handshake")
    amqp_heartbeat: int = option(
        5, _positive_int, "AMQP heartbeat interval in seconds; a broker silent for three intervals is given up"
    )
    prefetch: int = option(1000, _positive_int, "AMQP prefetch window (unacknowledged deliveries in flight)")
    queue_type: str = option(
        None, _one_of("classic", "quorum"),
        "this node's queue: quorum (replicated: survives the loss of a broker node) or classic (one broker node)",
        shown="quorum with several --amqp-url URLs, else classic",
    )
    queue_expires: float = option(300.0, _positive_float, "seconds this node's queue outlives its connection (x-expires)")
    queue_max_length: int = option(100000, _positive_int, "messages kept for this node while disconnected (x-max-length, drop-head)")
    unbind_grace: float = option(5.0, _non_negative_float, "seconds a group stays bound after its last local subscriber left")
    bind_timeout: float = option(10.0, _positive_float, "seconds a groups reply waits for its AMQP bindings")
    reconnect_max_delay: float = option(30.0, _positive_float, "cap of the exponential backoff between broker connection attempts")

    # -- Tower API authentication and limits --
    tower_url: str | None = option(
        None, tower_url, "Tower/AWX base URL: authenticate and authorize every websocket with its API"
    )
    tower_timeout: float = option(5.0, _positive_float, "seconds one Tower API request may take (then: unavailable)")
    tower_ca_file: str | None = option(
        None, _pem_certificates, "PEM file of CA certificates trusted for --tower-url",
        shown="the system's trust store",
    )
    object_paths: ObjectPaths = option(
        ObjectPaths.parse(DEFAULT_OBJECT_PATHS),
        ObjectPaths.parse,
        "API path checked for each id-keyed group: KEY:/api/v2/.../{id}/ entries",
        shown=DEFAULT_OBJECT_PATHS,
        brief="AWX's API path of each of the six *_events keys",
    )
    auth_cache_ttl: float = option(30.0, _non_negative_float, "seconds a Tower API yes (a user, an allowed object) is reused")
    auth_negative_cache_ttl: float = option(5.0, _non_negative_float, "seconds a Tower API no (401, 403, 404) is reused")
    allowed_origins: tuple[str, ...] = option(
        (), parse_origins, "browser Origins allowed, comma-separated (none: the Origin host must equal Host)",
        shown="(none)",
    )
    max_groups_per_connection: int = option(1000, _positive_int, "most groups one connection may hold")
    max_groups_messages_per_second: float = option(
        5.0, _positive_float, "groups messages handled per second per connection (bursts up to the same number; more wait)"
    )
    max_connections_per_user: int = option(100, _positive_int, "open websockets per user (more: close 1013)")
    max_connections: int = option(10000, _positive_int, "open websockets in total (more: close 1013)")

    # -- broker: TLS and faults --
    amqp_ca_file: str | None = option(
        None, _pem_certificates, "PEM CA certificate(s) trusted for amqps://", shown="the system's trust store"
    )
    amqp_cert_file: str | None = option(
        None, _pem_certificates, "PEM client certificate for amqps:// (may hold its key too)"
    )
    amqp_key_file: str | None = option(None, _pem_key, "PEM private key of --amqp-cert-file (unencrypted)")

    # -- operations: metrics, logs, shutdown --
    metrics_listen: str | None = option(
        None, _optional_strports,
        "serve /metrics, /healthz, /readyz here (e.g. tcp:9108:interface=127.0.0.1) instead of on listen",
    )
    log_format: str = option("text", _one_of("text", "json"), "log lines: text (twistd's format) or json (one object per line)")
    drain_timeout: float = option(
        10.0, _non_negative_float, "seconds shutdown waits for clients to leave after close 1001 (going away)"
    )

    # -- publishing --
    publish_secret_file: SecretFile | None = option(
        None, SecretFile.load, "file holding the bearer secret of POST /api/publish (unset: no HTTP publish API)"
    )
    publish_max_payload: int = option(
        65536, _positive_int, "largest payload of one HTTP-published message, in bytes of JSON (larger: 400)"
    )
    publish_timeout: float = option(
        10.0, _positive_float, "seconds the HTTP publish API waits for the broker's confirms (then 503)"
    )
    console: bool = flag("serve the live console at GET /console")

    # -- flow control --
    max_pending_bytes: int = option(
        4 * 1024 * 1024, _positive_int,
        "bytes a client may fall behind (queued since its send buffer was last empty); more: close 1013",
    )


OPTIONS: tuple[dataclasses.Field, ...] = tuple(dataclasses.fields(Settings))


def cli_name(key: str) -> str:
    return key.replace("_", "-")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _parse(key: str, text: str, origin: str) -> Any:
    fld = next(f for f in OPTIONS if f.name == key)
    try:
        return fld.metadata["parse"](text)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--{cli_name(key)} ({origin}): {exc}") from None


def read_config_file(path: str) -> dict[str, str]:
    """The ``[towerws]`` section of an INI file, keys checked against the known options."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fp:
            parser.read_file(fp)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    except ValueError as exc:  # open() refuses a path with a NUL byte in it
        raise ConfigError(f"config file {path}: cannot read: {exc}") from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid INI: {first}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"config file {path}: no [{SECTION}] section")
    known = {f.name for f in OPTIONS}
    values = dict(parser.items(SECTION))
    for key in values:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
    return values


def _check_tower_options(settings: Settings) -> None:
    """Options that only make sense together: every id-keyed group needs an API path."""
    if settings.tower_url is None:
        return
    missing = sorted(settings.groups.id_keys - settings.object_paths.paths.keys())
    if missing:
        raise ConfigError(f"--object-paths: no API path for the id-keyed group(s) {', '.join(missing)} "
                          "(each is checked against --tower-url)")
    if settings.tower_timeout >= settings.open_handshake_timeout:
        raise ConfigError("--tower-timeout: must be shorter than --open-handshake-timeout "
                          "(authentication happens inside the opening handshake)")


def load(
    cli: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Merge the sources by precedence and validate once.

    ``cli`` maps option keys (``amqp_url``) to the raw strings given on the
    command line (``None`` = not given).  ``config_file`` falls back to
    ``TOWERWS_CONFIG`` in ``environ``.
    """
    cli = cli or {}
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    from_file = read_config_file(config_file) if config_file else {}

    values: dict[str, Any] = {}
    for fld in OPTIONS:
        key = fld.name
        if cli.get(key) is not None:
            values[key] = _parse(key, cli[key], "command line")
        elif env_name(key) in environ:
            values[key] = _parse(key, environ[env_name(key)], f"environment {env_name(key)}")
        elif key in from_file:
            values[key] = _parse(key, from_file[key], f"config file {config_file}")
    settings = Settings(**values)
    _check_tower_options(settings)
    _check_amqp_tls(settings)
    if settings.node_id is None:
        settings = dataclasses.replace(settings, node_id=default_node_id())
    if settings.queue_type is None:
        # A quorum queue on a single broker buys nothing and costs it ~35% more CPU per message.
        several = settings.amqp_url is not None and len(settings.amqp_url) > 1
        settings = dataclasses.replace(settings, queue_type="quorum" if several else "classic")
    return settings


def _check_amqp_tls(s: Settings) -> None:
    """The TLS files only make sense together with amqps://, and a key needs its certificate."""
    given = [k for k in ("amqp_ca_file", "amqp_cert_file", "amqp_key_file") if getattr(s, k) is not None]
    if given and s.amqp_url is None:
        raise ConfigError(f"--{cli_name(given[0])}: given, but --amqp-url is none (no broker to use TLS with)")
    if given and not s.amqp_url.tls:
        raise ConfigError(f"--{cli_name(given[0])}: given, but --amqp-url is not amqps:// (no plaintext with TLS files)")
    if s.amqp_key_file is not None and s.amqp_cert_file is None:
        raise ConfigError("--amqp-key-file: given without --amqp-cert-file")
    if s.amqp_cert_file is not None:
        from towerws import pem

        try:
            pem.check_client_certificate(s.amqp_cert_file, s.amqp_key_file)
        except ValueError as exc:
            option = "--amqp-key-file" if s.amqp_key_file else "--amqp-cert-file"
            raise ConfigError(f"{option}: {exc}") from None


def shown_default(fld: dataclasses.Field) -> str:
    """The default as an operator would write it."""
    if fld.metadata.get("shown") is not None:
        return fld.metadata["shown"]
    return "(none)" if fld.default is None else str(fld.default)


def options_table() -> str:
    """The option table of docs/configuration.md (tests/test_docs.py keeps the page equal to this)."""
    rows = [
        "| option | config key | environment | default | meaning |",
        "|---|---|---|---|---|",
        "| `--config` | | `TOWERWS_CONFIG` | | INI config file |",
    ]
    for fld in OPTIONS:
        default = shown_default(fld).replace("|", "\\|")
        rows.append(
            f"| `--{cli_name(fld.name)}` | `{fld.name}` | `{env_name(fld.name)}` | `{default}` | {fld.metadata['help']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    sys.stdout.write(options_table() + "\n")
