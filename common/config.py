"""Typed configuration, built once per process from flags > environment > ``~/.llmlb/.env`` > defaults.

Every setting has one place here, with the environment variables that set it. ``--help`` of both
CLIs and docs/configuration.md list the same names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from common.secret import Secret, secret_or_none

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
T = TypeVar("T")


def llmlb_home(env: Mapping[str, str] | None = None) -> Path:
    """``LLMLB_HOME`` or ``~/.llmlb``: where the .env file, the database and keys live by default."""
    env = os.environ if env is None else env
    return Path(env.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser()


def read_env_file(path: Path) -> dict[str, str]:
    """Parses a dotenv file: ``KEY=value`` lines, ``#`` comments, optional ``export`` and quotes."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if key:
            values[key] = value
    return values


class Settings:
    """Looks a setting up: a flag value first, then the process environment, then the .env file."""

    def __init__(self, env: Mapping[str, str] | None = None, env_file: Path | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.env_file = env_file if env_file is not None else llmlb_home(self.env) / ".env"
        self.file_values = read_env_file(self.env_file)

    def raw(self, *names: str) -> str | None:
        for source in (self.env, self.file_values):
            for name in names:
                value = source.get(name)
                if value not in (None, ""):
                    return value
        return None

    def get(self, flag: T | None, names: tuple[str, ...], default: T, parse: Callable[[str], T]) -> T:
        if flag is not None:
            return flag
        value = self.raw(*names)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{names[0]}={value!r}: {exc}") from None


def merged_env(home: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment over ``<home>/.env``: for settings read as a block (the node's pool settings)."""
    s = Settings(env, home / ".env")
    return {**s.file_values, **{k: v for k, v in s.env.items() if v != ""}}


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def normalize_origin(url: str) -> str:
    """``scheme://host[:port]`` in lower case, the form origins are compared in."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"origin {url!r} is not an http(s) URL")
    default_port = {"http": 80, "https": 443}[parts.scheme]
    port = parts.port
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default_port else "")


def origin_listed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``origin`` is one of ``allowed``, compared as ``scheme://host[:port]``."""
    try:
        return normalize_origin(origin) in {normalize_origin(o) for o in allowed}
    except ValueError:
        return False


def parse_balancers(value: str) -> tuple[str, ...]:
    """A comma-separated list of balancer addresses, each ``host:port``, in the order to try them.

    One entry may be a DNS name that resolves to several addresses: gRPC resolves it and its default
    ``pick_first`` policy tries each address in turn, so that case needs no list. ``unix:`` targets
    pass as they are.
    """
    entries = tuple(item.strip() for item in value.split(","))
    if not value.strip():
        raise ValueError("expected host:port[,host:port...]")
    for entry in entries:
        if not entry:
            raise ValueError("an empty entry in the list; expected host:port[,host:port...]")
        if entry.startswith("unix:"):
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
            raise ValueError(f"{entry!r} is not host:port")
    return entries


def parse_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError("expected host:port")
    return f"{host or '0.0.0.0'}:{int(port)}"


def parse_port(value: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    if not value.strip().isdigit() or int(value) > 65535:
        raise ValueError("expected a port from 0 to 65535")
    return int(value)


# The bulk paths' fixed default ports, one above each gRPC default, so that a firewall rule between
# hosts can name them: the balancer's bulk proxy and a node's bulk (peer file) server.
BALANCER_BULK_PORT = 50052
NODE_BULK_PORT = 50062


def bulk_listen_beside(s: Settings, grpc_listen: str, port_names: tuple[str, ...], port: int) -> str:
    """The default bulk address: the gRPC host, and the port ``port_names`` set, else ``port``.

    A process whose gRPC port is 0 (any free one, as tests and benchmarks ask) gets any free bulk port
    too, so that many of them can run on one host.
    """
    host, _, grpc_port = grpc_listen.rpartition(":")
    return f"{host}:{s.get(None, port_names, 0 if grpc_port == '0' else port, parse_port)}"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP/1.1 port lets any caller, authorized or not, hold before its request is read.

    Applied alike to the balancer's HTTP door and bulk port and to a node's bulk and metrics ports.
    """

    max_header_bytes: int = 64 * 1024  # request line and headers together; over it: 431, then closed
    header_timeout_s: float = 10.0  # from the connection (or a request's first byte) to its last header
    keepalive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 1024  # open connections per port; more are closed as soon as they connect


DEFAULT_HTTP_LIMITS = HttpLimits()


def load_http_limits(s: Settings, prefixes: tuple[str, ...]) -> HttpLimits:
    """The HTTP limits from ``<prefix>MAX_HEADER_KB``, ``HEADER_TIMEOUT``, ``KEEPALIVE_TIMEOUT`` and
    ``MAX_CONNECTIONS``, the first prefix set winning."""
    default = DEFAULT_HTTP_LIMITS

    def names(suffix: str) -> tuple[str, ...]:
        return tuple(prefix + suffix for prefix in prefixes)

    return HttpLimits(
        max_header_bytes=1024
        * s.get(None, names("MAX_HEADER_KB"), default.max_header_bytes // 1024, parse_count),
        header_timeout_s=s.get(None, names("HEADER_TIMEOUT"), default.header_timeout_s, parse_positive),
        keepalive_timeout_s=s.get(
            None, names("KEEPALIVE_TIMEOUT"), default.keepalive_timeout_s, parse_positive
        ),
        max_connections=s.get(None, names("MAX_CONNECTIONS"), default.max_connections, parse_count),
    )


OTEL_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def load_otel(s: Settings) -> tuple[tuple[str, str], ...]:
    """The standard ``OTEL_*`` variables (environment over ``.env``), for ``common.tracing``.

    The OpenTelemetry SDK reads them itself; here they are only gathered, and the few that decide
    whether and how traces leave the process are checked, so a bad value stops the start.
    """
    otel = {k: v for source in (s.file_values, s.env) for k, v in source.items() if k.startswith("OTEL_")}
    if traces_wanted(otel):
        exporter = otel.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter != "otlp":
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: expected otlp or none")
        protocol = otlp_protocol(otel)
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected grpc or http/protobuf")
    return tuple(sorted(otel.items()))


def traces_wanted(otel: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces: an OTLP endpoint set, the SDK and exporter on."""
    if otel.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if otel.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(otel.get(name, "").strip() for name in OTEL_ENDPOINTS)


def otlp_protocol(otel: Mapping[str, str]) -> str:
    """The OTLP protocol for traces; ``grpc`` unless set."""
    return next((otel[n].strip() for n in OTEL_PROTOCOLS if otel.get(n, "").strip()), "grpc")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Everything the balancer process is told, resolved once at start."""

    home: Path
    grpc_listen: str = "127.0.0.1:50051"
    database_url: str = ""
    # Connections a PostgreSQL store keeps open (a burst may open a few more); unused with SQLite.
    database_pool_size: int = 5
    catalog_path: Path | None = None
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: Secret | None = None  # a Secret: printed masked, wherever the config goes
    allowed_origins: tuple[str, ...] = (DEFAULT_HF_ENDPOINT,)
    origin_timeout_s: float = 30.0
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 3000
    # How long one window of the fleet token lasts (``balancer.fleet_token``): a node holds this
    # window's token and the next, renewed over its session, so a token works at most twice this long.
    fleet_token_ttl_s: float = 3600.0
    # A replica whose beat is older than this is taken as dead and the nodes it held as offline.
    # Longer than a node's timeout: a busy replica must not be declared dead by a late beat, and a
    # killed replica's nodes do not wait for it (they attach to another replica by themselves).
    replica_timeout_ms: int = 10_000
    log_format: str = "console"
    log_level: str = "info"
    # The standard OTEL_* variables (``common.tracing``): traces are exported when they name an endpoint.
    # Not in repr: OTEL_EXPORTER_OTLP_HEADERS may carry a collector's credential.
    otel: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # One line per request at the edge, both doors (``balancer.edge.access_log``), at level info.
    access_log: bool = False
    # The HTTP shim (OpenAI API, /v0 management, /metrics); empty: no HTTP door.
    http_listen: str = "127.0.0.1:8080"
    # The bulk proxy (HTTP range requests, origin bytes passed through): host:port, "" when off.
    bulk_listen: str = f"127.0.0.1:{BALANCER_BULK_PORT}"
    # Keys: when on, every call but health checks needs a bearer key with the right scope.
    auth: bool = True
    # LLMLB_ADMIN_KEY: an admin key's secret the operator chose, stored at start if the store lacks it
    # (automated deployments: no generated admin-key file to read back). A Secret: printed masked.
    admin_key: Secret | None = None
    # Tokens the store does not hold: how many are remembered and for how long (apart from real
    # keys, which they can never push out), and how many never-seen tokens one client address may
    # have looked up in the store a second (as many at once); past that they are refused unread.
    unknown_key_cache: int = 10_000
    unknown_key_ttl_s: float = 30.0
    unknown_key_rate: float = 5.0
    # TLS for the gRPC door; with a client CA, callers must present a certificate it signed (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Routing: the policy for chat and completions (``ROUTING_POLICIES``; embeddings, audio and images
    # are routed by load alike), in-flight requests per node before it counts as busy, the wait queue.
    # A node that reports its slots for a loaded model (the sequences its engine runs at once) is busy
    # for that model at its slots plus ``node_queue_allowance`` (one waiting on the node refills a
    # finished slot at the engine's next step, without a trip back to the balancer); a node that
    # reports none (an older node, a model not loaded yet) is busy at ``node_max_inflight``, node-wide.
    routing: str = "cache-aware"
    node_max_inflight: int = 8
    node_queue_allowance: int = 1
    queue_size: int = 256
    queue_timeout_s: float = 30.0
    # A request whose expected wait in that queue (requests ahead times the recent service time,
    # over the slots) is longer is refused at once (429 with Retry-After) rather than left to time out.
    max_queue_wait_s: float = 15.0
    request_timeout_s: float = 600.0  # deadline for a routed call when the caller sets none
    route_attempts: int = 3  # distinct nodes a request may be tried on before the error is returned
    cooldown_failures: int = 3  # consecutive failures that put a node in cooldown
    cooldown_s: float = 10.0
    # Largest HTTP request body (audio uploads, image edits); gRPC messages are bounded from it too.
    max_body_mb: int = 64
    http_limits: HttpLimits = DEFAULT_HTTP_LIMITS  # the HTTP door's and the bulk port's
    # On SIGTERM, how long calls in flight may take to finish before they are cut (under the usual
    # 30 s an orchestrator waits before it kills).
    stop_grace_s: float = 25.0
    usage_flush_s: float = 5.0  # how often usage counted in memory is written to the store
    # How often each replica flushes its usage and reads every replica's totals of the keys with limits
    # it serves (``balancer.edge.limits``): a replica may overshoot a key's limit by what the others
    # admitted within about this long.
    key_limits_sync_s: float = 1.0
    # The scheduler: how often it reconciles deployments with the fleet, and how long its lease in the
    # store lasts unrenewed (the replica acting on deployments; another takes over once it lapses).
    schedule_interval_s: float = 1.0
    schedule_lease_s: float = 5.0
    # Autoscaling of min/max deployments (``balancer.scheduler.autoscaler``), each deployment on its own
    # demand: one copy more when, for ``scale_up_window_s``, requests waited longer than
    # ``scale_up_queue_wait_s`` on average or more were in flight per ready copy than its slots (those
    # its node reports for the model; ``scale_up_inflight`` for a node reporting none); one fewer (down
    # to min, so to zero) after ``scale_down_idle_s`` with no request, or after ``scale_down_window_s``
    # with the requests in flight under a quarter of one copy fewer's slots.
    scale_up_queue_wait_s: float = 2.0
    scale_up_inflight: int = 4
    scale_up_window_s: float = 10.0
    scale_down_idle_s: float = 300.0
    scale_down_window_s: float = 300.0
    # Replica processes ``llmlb serve`` starts on this host, sharing its ports (PostgreSQL only).
    workers: int = 1
    # This process is one of those workers: it binds its ports shared (SO_REUSEPORT).
    shared_ports: bool = False

    @property
    def admin_key_file(self) -> Path:
        """Where the first start writes the bootstrap admin key (mode 0600)."""
        return self.home / "admin-key"

    def origin_allowed(self, origin: str) -> bool:
        return origin_listed(origin, self.allowed_origins)


# What an operator-chosen admin key looks like: the prefix of the keys the balancer mints, then at least
# 32 URL-safe characters (``llmlb-`` and ``openssl rand -hex 32``, or ``secrets.token_urlsafe(32)``).
ADMIN_KEY_FORMAT = re.compile(r"llmlb-[A-Za-z0-9_-]{32,256}")


def parse_admin_key(value: str | None) -> Secret | None:
    """``LLMLB_ADMIN_KEY`` checked; the error never repeats the value, which is a secret."""
    if value is None:
        return None
    if not ADMIN_KEY_FORMAT.fullmatch(value):
        raise ValueError(
            "LLMLB_ADMIN_KEY is malformed: expected 'llmlb-' then 32 to 256 letters, digits, '-' or '_'"
            " (e.g. llmlb-$(openssl rand -hex 32))"
        )
    return Secret(value)


# The names of ``balancer.router.policy.POLICIES`` (a test keeps the two alike): checked here so a bad
# value is a configuration error at start, not a failure at the first request.
ROUTING_POLICIES = ("cache-aware", "power-of-two", "round-robin")


def parse_routing(value: str) -> str:
    """A routing policy name (``ROUTING_POLICIES``), case and spaces aside."""
    name = value.strip().lower()
    if name not in ROUTING_POLICIES:
        raise ValueError(f"routing policy {value!r}: expected {', '.join(ROUTING_POLICIES)}")
    return name


def home_catalog(home: Path) -> Path | None:
    """``$LLMLB_HOME/supported_models.json`` when an operator placed one there."""
    path = home / "supported_models.json"
    return path if path.is_file() else None


WORKER_ENV = "LLMLB_WORKER"  # set by ``llmlb serve --workers N`` on each worker it starts (its index)


def load_balancer_config(
    *,
    grpc_listen: str | None = None,
    database_url: str | None = None,
    catalog_path: Path | None = None,
    hf_endpoint: str | None = None,
    allowed_origins: tuple[str, ...] | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    http_listen: str | None = None,
    auth: bool | None = None,
    workers: int | None = None,
    routing: str | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> BalancerConfig:
    """Builds the balancer's config: each argument is a CLI flag and wins over the environment."""
    home = home or llmlb_home(env)
    s = Settings(env, home / ".env")
    endpoint = s.get(hf_endpoint, ("HF_ENDPOINT",), DEFAULT_HF_ENDPOINT, str).rstrip("/")
    origins = s.get(allowed_origins, ("LLMLB_ALLOWED_ORIGINS",), (endpoint,), parse_list)
    for origin in origins:
        normalize_origin(origin)  # fail at start on a malformed allowlist entry, not at first use
    fmt = s.get(log_format, ("LLMLB_LOG_FORMAT",), "console", str).lower()
    if fmt not in ("console", "json"):
        raise ValueError(f"LLMLB_LOG_FORMAT={fmt!r}: expected console or json")
    tls_cert = s.get(None, ("LLMLB_TLS_CERT",), None, Path)
    grpc_address = s.get(grpc_listen, ("LLMLB_GRPC_LISTEN",), "127.0.0.1:50051", parse_listen)
    tls_key = s.get(None, ("LLMLB_TLS_KEY",), None, Path)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("LLMLB_TLS_CERT and LLMLB_TLS_KEY go together: set both or neither")
    return BalancerConfig(
        home=home,
        grpc_listen=grpc_address,
        database_url=s.get(
            database_url, ("LLMLB_DATABASE_URL",), f"sqlite+aiosqlite:///{home / 'llmlb.db'}", str
        ),
        database_pool_size=s.get(None, ("LLMLB_DATABASE_POOL_SIZE",), 5, parse_count),
        # No --catalog nor LLMLB_CATALOG: $LLMLB_HOME/supported_models.json if there, else the packaged one.
        catalog_path=s.get(catalog_path, ("LLMLB_CATALOG",), home_catalog(home), Path),
        hf_endpoint=endpoint,
        hf_token=secret_or_none(s.raw("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")),
        allowed_origins=origins,
        origin_timeout_s=s.get(None, ("LLMLB_ORIGIN_TIMEOUT",), 30.0, float),
        heartbeat_interval_ms=s.get(None, ("LLMLB_HEARTBEAT_INTERVAL_MS",), 1000, int),
        heartbeat_timeout_ms=s.get(None, ("LLMLB_HEARTBEAT_TIMEOUT_MS",), 3000, int),
        fleet_token_ttl_s=s.get(None, ("LLMLB_FLEET_TOKEN_TTL",), 3600.0, parse_positive),
        replica_timeout_ms=s.get(None, ("LLMLB_REPLICA_TIMEOUT_MS",), 10_000, int),
        log_format=fmt,
        log_level=s.get(log_level, ("LLMLB_LOG_LEVEL",), "info", str).lower(),
        otel=load_otel(s),
        access_log=s.get(None, ("LLMLB_ACCESS_LOG",), False, parse_bool),
        http_listen=s.get(http_listen, ("LLMLB_HTTP_LISTEN",), "127.0.0.1:8080", parse_optional_listen),
        # Beside the gRPC port; off under TLS, since the bulk path is plain HTTP.
        bulk_listen=s.get(
            None,
            ("LLMLB_BULK_LISTEN",),
            ""
            if tls_cert is not None
            else bulk_listen_beside(s, grpc_address, ("LLMLB_BULK_PORT",), BALANCER_BULK_PORT),
            parse_optional_listen,
        ),
        auth=s.get(auth, ("LLMLB_AUTH",), True, parse_bool),
        admin_key=parse_admin_key(s.raw("LLMLB_ADMIN_KEY")),
        unknown_key_cache=s.get(None, ("LLMLB_UNKNOWN_KEY_CACHE",), 10_000, parse_count),
        unknown_key_ttl_s=s.get(None, ("LLMLB_UNKNOWN_KEY_TTL",), 30.0, parse_positive),
        unknown_key_rate=s.get(None, ("LLMLB_UNKNOWN_KEY_RATE",), 5.0, parse_positive),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=s.get(None, ("LLMLB_TLS_CLIENT_CA",), None, Path),
        routing=s.get(routing, ("LLMLB_ROUTING",), "cache-aware", parse_routing),
        node_max_inflight=s.get(None, ("LLMLB_NODE_MAX_INFLIGHT",), 8, parse_count),
        node_queue_allowance=s.get(None, ("LLMLB_NODE_QUEUE_ALLOWANCE",), 1, parse_count_or_zero),
        queue_size=s.get(None, ("LLMLB_QUEUE_SIZE",), 256, parse_count_or_zero),
        queue_timeout_s=s.get(None, ("LLMLB_QUEUE_TIMEOUT",), 30.0, parse_positive),
        max_queue_wait_s=s.get(None, ("LLMLB_MAX_QUEUE_WAIT",), 15.0, parse_positive),
        request_timeout_s=s.get(None, ("LLMLB_REQUEST_TIMEOUT",), 600.0, parse_positive),
        route_attempts=s.get(None, ("LLMLB_ROUTE_ATTEMPTS",), 3, parse_count),
        cooldown_failures=s.get(None, ("LLMLB_COOLDOWN_FAILURES",), 3, parse_count),
        cooldown_s=s.get(None, ("LLMLB_COOLDOWN",), 10.0, parse_positive),
        max_body_mb=s.get(None, ("LLMLB_MAX_BODY_MB",), 64, parse_count),
        http_limits=load_http_limits(s, ("LLMLB_",)),
        stop_grace_s=s.get(None, ("LLMLB_STOP_GRACE",), 25.0, parse_positive),
        usage_flush_s=s.get(None, ("LLMLB_USAGE_FLUSH",), 5.0, parse_positive),
        key_limits_sync_s=s.get(None, ("LLMLB_KEY_LIMITS_SYNC",), 1.0, parse_positive),
        schedule_interval_s=s.get(None, ("LLMLB_SCHEDULE_INTERVAL",), 1.0, parse_positive),
        schedule_lease_s=s.get(None, ("LLMLB_SCHEDULE_LEASE",), 5.0, parse_positive),
        scale_up_queue_wait_s=s.get(None, ("LLMLB_SCALE_UP_QUEUE_WAIT",), 2.0, parse_positive),
        scale_up_inflight=s.get(None, ("LLMLB_SCALE_UP_INFLIGHT",), 4, parse_count),
        scale_up_window_s=s.get(None, ("LLMLB_SCALE_UP_WINDOW",), 10.0, parse_positive),
        scale_down_idle_s=s.get(None, ("LLMLB_SCALE_DOWN_IDLE",), 300.0, parse_positive),
        scale_down_window_s=s.get(None, ("LLMLB_SCALE_DOWN_WINDOW",), 300.0, parse_positive),
        workers=s.get(workers, ("LLMLB_WORKERS",), 1, parse_count),
        shared_ports=s.raw(WORKER_ENV) is not None,
    )


def resolve_models_dir(
    flag: Path | None = None, env: Mapping[str, str] | None = None, home: Path | None = None
) -> Path:
    """A node's models dir: ``--models-dir`` > ``XLLM_MODELS_DIR`` > ``LLM_MODELS_DIR`` > default.

    The default is ``<home>/models``; home is ``--home``, else ``$LLMLB_HOME`` (``~/.llmlb``), and its
    ``.env`` file is read too.
    """
    home = home or llmlb_home(env)
    s = Settings(env, home / ".env")
    default = home / "models"
    return s.get(flag, ("XLLM_MODELS_DIR", "LLM_MODELS_DIR"), default, Path).expanduser()


def parse_backend_name(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("auto", "cuda", "metal", "cpu"):
        raise ValueError("expected auto, cuda, metal or cpu")
    return lowered


def parse_download_via(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("origin", "balancer"):
        raise ValueError("expected origin or balancer")
    return lowered


def parse_positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("expected a positive number")
    return number


def parse_seconds_or_zero(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a number of seconds, 0 or more")
    return number


def parse_count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def parse_count_or_zero(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("expected a whole number of at least 0")
    return number


def parse_optional_listen(value: str) -> str:
    """``host:port``, or ``off`` (returned as empty) for a door that should not open."""
    return "" if value.strip().lower() in ("off", "none", "-") else parse_listen(value)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node process (``xllm serve``) is told, resolved once at start."""

    home: Path
    models_dir: Path
    shared_dir: Path | None = None
    balancer: str = "127.0.0.1:50051"  # one address, or several joined by commas (see ``balancers``)
    grpc_listen: str = "127.0.0.1:50061"
    advertise: str = ""  # host:port the balancer and peers dial; the listen address when empty
    node_id: str = ""  # empty: the id saved in <home>/node-id, else one the balancer assigns
    backend: str = "auto"
    download_via: str = "origin"
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: Secret | None = None  # this and the two tokens below: Secrets, printed masked
    allowed_origins: tuple[str, ...] = (DEFAULT_HF_ENDPOINT,)
    max_downloads: int = 1
    download_stall_timeout_s: float = 60.0
    download_timeout_s: float = 300.0
    peer_fetch: bool = True
    # Ranges fetched at once per file, and their size: see node/downloader.py for the measured defaults.
    download_connections: int = 4
    download_piece_mb: int = 32
    # The node's bulk (HTTP range) server for peers: host:port, port 0 picks a free one; "" turns it off.
    bulk_listen: str = f"127.0.0.1:{NODE_BULK_PORT}"
    shared_dir_timeout_s: float = 2.0
    # Seconds between looks for model folders placed by hand (node/local_models.py); 0: at start only.
    local_scan_interval_s: float = 5.0
    auth_token: Secret = field(default_factory=Secret)
    log_format: str = "console"
    log_level: str = "info"
    # The standard OTEL_* variables (``common.tracing``): traces are exported when they name an endpoint.
    # Not in repr: OTEL_EXPORTER_OTLP_HEADERS may carry a collector's credential.
    otel: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # The bearer key (scope node) the node presents to the balancer.
    api_key: Secret = field(default_factory=Secret)
    tls_ca: Path | None = None  # CA that signed the balancer's certificate; set: dial it with TLS
    tls_cert: Path | None = None  # client certificate for mTLS with the balancer
    tls_key: Path | None = None
    metrics_listen: str = ""  # host:port of the node's Prometheus /metrics; empty: off
    http_limits: HttpLimits = DEFAULT_HTTP_LIMITS  # the bulk and metrics ports'
    # Largest request the gRPC port takes, as the balancer's LLMLB_MAX_BODY_MB: the uploads it forwards.
    max_body_mb: int = 64
    # On SIGTERM, how long in-flight requests may take to finish: under the 30 s Kubernetes waits by
    # default before it kills (terminationGracePeriodSeconds), so the kill never lands mid-drain.
    drain_timeout_s: float = 25.0
    # The most memory the node offers and loads models into (MB); 0: 90 % of GPU memory, else 75 % of RAM.
    memory_budget_mb: int = 0
    labels: tuple[tuple[str, str], ...] = ()  # the operator's key=value labels, sent at registration

    @property
    def node_id_file(self) -> Path:
        return self.home / "node-id"

    @property
    def balancers(self) -> tuple[str, ...]:
        """The balancer addresses in the order the node tries them (``balancer`` holds them joined)."""
        return parse_balancers(self.balancer)

    def origin_allowed(self, origin: str) -> bool:
        return origin_listed(origin, self.allowed_origins)


def parse_labels(value: str | Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Node labels ``k=v``, comma-separated in one string or one per item, sorted by key; a key given
    twice keeps its last value."""
    items = parse_list(value) if isinstance(value, str) else tuple(v.strip() for v in value if v.strip())
    labels: dict[str, str] = {}
    for item in items:
        key, sep, label = (part.strip() for part in item.partition("="))
        if not sep or not key or not label or "=" in label:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key] = label
    return tuple(sorted(labels.items()))


def balancer_setting(s: Settings, flag: str | None, names: tuple[str, ...]) -> str:
    """The balancer list from ``flag`` or the first of ``names`` set, checked and joined with commas.

    Checked here so a malformed list stops the process at start, naming where it came from.
    """
    if flag is None:
        return ",".join(s.get(None, names, ("127.0.0.1:50051",), parse_balancers))
    try:
        return ",".join(parse_balancers(flag))
    except ValueError as exc:
        raise ValueError(f"--balancer={flag!r}: {exc}") from None


def load_node_config(
    *,
    models_dir: Path | None = None,
    shared_dir: Path | None = None,
    balancer: str | None = None,
    grpc_listen: str | None = None,
    advertise: str | None = None,
    node_id: str | None = None,
    backend: str | None = None,
    download_via: str | None = None,
    max_downloads: int | None = None,
    download_timeout_s: float | None = None,
    download_stall_timeout_s: float | None = None,
    peer_fetch: bool | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    api_key: str | None = None,
    metrics_listen: str | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    memory_budget_mb: int | None = None,
    labels: Sequence[str] | None = None,
) -> NodeConfig:
    """Builds a node's config: each argument is an ``xllm serve`` flag and wins over the environment."""
    home = home or llmlb_home(env)
    s = Settings(env, home / ".env")
    endpoint = s.get(None, ("HF_ENDPOINT",), DEFAULT_HF_ENDPOINT, str).rstrip("/")
    default_origins: tuple[str, ...] = (endpoint,)
    origins = s.get(None, ("XLLM_ALLOWED_ORIGINS", "LLMLB_ALLOWED_ORIGINS"), default_origins, parse_list)
    for origin in origins:
        normalize_origin(origin)
    fmt = s.get(log_format, ("XLLM_LOG_FORMAT", "LLMLB_LOG_FORMAT"), "console", str).lower()
    if fmt not in ("console", "json"):
        raise ValueError(f"XLLM_LOG_FORMAT={fmt!r}: expected console or json")
    downloads = s.get(max_downloads, ("XLLM_MAX_DOWNLOADS",), 1, int)
    if downloads < 1:
        raise ValueError("XLLM_MAX_DOWNLOADS must be at least 1")
    shared = s.get(shared_dir, ("XLLM_SHARED_DIR",), None, Path)
    if memory_budget_mb is not None and memory_budget_mb < 0:
        raise ValueError(f"--memory-budget-mb={memory_budget_mb}: expected a whole number of at least 0")
    return NodeConfig(
        home=home,
        models_dir=resolve_models_dir(models_dir, s.env, home),
        shared_dir=shared.expanduser() if shared is not None else None,
        balancer=balancer_setting(s, balancer, ("XLLM_BALANCER", "LLMLB_ADDR")),
        grpc_listen=s.get(grpc_listen, ("XLLM_GRPC_LISTEN",), "127.0.0.1:50061", parse_listen),
        advertise=s.get(advertise, ("XLLM_ADVERTISE",), "", str),
        node_id=s.get(node_id, ("XLLM_NODE_ID",), "", str),
        backend=s.get(backend, ("XLLM_BACKEND",), "auto", parse_backend_name),
        download_via=s.get(download_via, ("XLLM_DOWNLOAD_VIA",), "origin", parse_download_via),
        hf_endpoint=endpoint,
        hf_token=secret_or_none(s.raw("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")),
        allowed_origins=origins,
        max_downloads=downloads,
        download_stall_timeout_s=s.get(
            download_stall_timeout_s, ("XLLM_DOWNLOAD_STALL_TIMEOUT",), 60.0, parse_positive
        ),
        download_timeout_s=s.get(download_timeout_s, ("XLLM_DOWNLOAD_TIMEOUT",), 300.0, parse_positive),
        peer_fetch=s.get(peer_fetch, ("XLLM_PEER_FETCH",), True, parse_bool),
        download_connections=s.get(None, ("XLLM_DOWNLOAD_CONNECTIONS",), 4, parse_count),
        download_piece_mb=s.get(None, ("XLLM_DOWNLOAD_PIECE_MB",), 32, parse_count),
        bulk_listen=s.get(
            None,
            ("XLLM_BULK_LISTEN",),
            # Beside the gRPC port, on the same interface, unless told otherwise.
            bulk_listen_beside(
                s,
                s.get(grpc_listen, ("XLLM_GRPC_LISTEN",), "127.0.0.1:50061", parse_listen),
                ("XLLM_BULK_PORT",),
                NODE_BULK_PORT,
            ),
            parse_optional_listen,
        ),
        shared_dir_timeout_s=s.get(None, ("XLLM_SHARED_DIR_TIMEOUT",), 2.0, parse_positive),
        local_scan_interval_s=s.get(None, ("XLLM_LOCAL_SCAN_INTERVAL",), 5.0, parse_seconds_or_zero),
        auth_token=Secret(s.get(None, ("XLLM_AUTH_TOKEN",), "", str)),
        log_format=fmt,
        log_level=s.get(log_level, ("XLLM_LOG_LEVEL", "LLMLB_LOG_LEVEL"), "info", str).lower(),
        otel=load_otel(s),
        api_key=Secret(s.get(api_key, ("XLLM_API_KEY",), "", str)),
        tls_ca=s.get(None, ("XLLM_TLS_CA",), None, Path),
        tls_cert=s.get(None, ("XLLM_TLS_CERT",), None, Path),
        tls_key=s.get(None, ("XLLM_TLS_KEY",), None, Path),
        metrics_listen=s.get(metrics_listen, ("XLLM_METRICS_LISTEN",), "", parse_optional_listen),
        http_limits=load_http_limits(s, ("XLLM_", "LLMLB_")),
        max_body_mb=s.get(None, ("XLLM_MAX_BODY_MB", "LLMLB_MAX_BODY_MB"), 64, parse_count),
        drain_timeout_s=s.get(None, ("XLLM_DRAIN_TIMEOUT",), 25.0, parse_positive),
        memory_budget_mb=s.get(memory_budget_mb, ("XLLM_MEMORY_BUDGET_MB",), 0, parse_count_or_zero),
        labels=parse_labels(labels) if labels else s.get(None, ("XLLM_LABELS",), (), parse_labels),
    )
