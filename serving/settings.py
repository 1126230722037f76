"""Server settings: one `Settings(BaseSettings)` read from init kwargs, `SLIMREC_*` env and a TOML file.

Precedence, highest first: keyword arguments (the CLI), environment (`SLIMREC_VARIANTS`,
`SLIMREC_SPLIT`, `SLIMREC_ADMIN_TOKEN`, ...), the TOML file named by `config_file` /
`SLIMREC_CONFIG_FILE`, then the defaults below.

Variants and the split accept a mapping or the CLI's compact text form:

    SLIMREC_VARIANTS="full=artifacts/teacher,compressed=artifacts/compressed"
    SLIMREC_SPLIT="full=50,compressed=50"       # or JSON: '{"full": 50, "compressed": 50}'
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_K = 200


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """Parse "a=x,b=y" (or a JSON object) into {"a": "x", "b": "y"}; ValueError names the bad part.

    Example:
        >>> parse_pairs("full=50,compressed=50", "split")
        {'full': '50', 'compressed': '50'}
    """
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"{what}: expected a JSON object, got {text!r}")
        return value
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{what}: expected NAME=VALUE, got {part!r}")
        if name.strip() in pairs:
            raise ValueError(f"{what}: {name.strip()!r} given twice")
        pairs[name.strip()] = value.strip()
    return pairs


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything `slimrec serve` can be told; validated at construction (ValueError on bad values)."""

    model_config = SettingsConfigDict(env_prefix="SLIMREC_", extra="forbid", validate_default=True)

    config_file: Path | None = Field(None, description="TOML file with any of these settings")
    variants: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    split: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="weights per variant; empty = equal weights"
    )
    salt: str = Field("slimrec-ab-1", min_length=1, description="A/B hash salt; change it to reshuffle users")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # No "trace": uvicorn's trace logging prints every request scope, Authorization header included.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # serving/observability.py: JSON lines carry the request id; so do text lines a request causes.
    log_format: Literal["text", "json"] = Field(
        "text", description="json: every log line a JSON object, plus one line per /v1 request"
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access line per request (text format, at info or debug). Off by default: "
        "the exposure log and /metrics record every recommendation, and the line costs 8-16% of a "
        "compressed request's CPU; JSON logs write their own request line instead",
    )
    tracing: bool | None = Field(
        None,
        description="OpenTelemetry traces (the otel extra); unset: on when OTEL_TRACES_EXPORTER "
        "or an OTLP endpoint is set; OTEL_SDK_DISABLED=true turns them off",
    )
    n_candidates: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="FAISS top-N handed to the ranker, for every variant; unset: each variant's "
        "artifact's (chosen on validation by `slimrec compress`), else 200",
    )
    batch_max_size: int = Field(16, ge=1, le=4096, description="1 turns the batcher off")
    # Under concurrent load a batch waits up to this long to fill (serving/batcher.py); a lone
    # request never waits. 0: a batch is whatever queued while the previous one ran. Unset: see
    # batch_wait_s.
    batch_max_wait_ms: float | None = Field(None, ge=0, le=1000)
    batch_threads: int = Field(1, ge=1, le=64, description="batches each variant runs at once")
    model_threads: int = Field(
        2,
        ge=1,
        le=256,
        description="threads running model calls when batching "
        "is off (batch_max_size 1); batched, each variant has batch_threads",
    )
    ort_threads: int = Field(1, ge=0, le=256, description="ONNX Runtime intra-op threads per session")
    # FAISS parallelises one search over OpenMP threads that spin between calls; with the model
    # thread pool already running searches side by side, more than one per search oversubscribes
    # the cores (measured on 2 cores, locust at saturation: 438 vs 387 RPS, compressed variant).
    index_threads: int = Field(1, ge=0, le=256, description="FAISS OpenMP threads per search (0 = all cores)")
    # The model threads drop the GIL inside ONNX Runtime and FAISS and need it back after every
    # call; with CPython's default 5 ms switch interval they wait behind the event loop's Python
    # that long each time (locust at saturation, compressed on ml-100k: 673 RPS at 5 ms, 829 at 0.1).
    gil_switch_interval_ms: float = Field(
        0.1, gt=0, le=100, description="sys.setswitchinterval of the server process"
    )
    # Model calls in child processes (serving/model_process.py): no GIL shared with the event
    # loop, at the price of the model's memory once more per child.
    model_process: bool = Field(
        False,
        description="run each variant's model calls in child processes "
        "(one per batch thread; per model thread when batching is off), each "
        "with its own GIL",
    )
    shadow_fraction: float = Field(0.0, ge=0, le=1)
    allow_variant_override: bool | None = Field(
        None, description="honour X-Slimrec-Variant; default: only when bound to loopback"
    )
    admin_token: SecretStr | None = None
    artifacts_roots: Annotated[list[Path], NoDecode] | None = Field(
        None, description="reload paths must lie under one of these; default: the variants' parents"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_history: int = Field(1000, ge=1, le=100_000)
    max_in_flight: int = Field(
        64,
        ge=1,
        le=100_000,
        description="recommendation requests handled at once; past it: 503 with Retry-After, no queueing",
    )
    request_timeout_ms: float = Field(
        2000.0, gt=0, le=600_000, description="per-request deadline for recommendations; past it: 504"
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After sent with 503 answers")
    # Live state and outcome logs (serving/state.py, serving/eventlog.py, serving/events.py).
    state: str | None = Field(
        None,
        description="where live histories and the split live: unset = in this process (histories "
        "rebuilt from the event log, the split in state_dir/split.json); redis://HOST:PORT/DB = "
        "shared by every server process that names the same Redis",
    )
    state_dir: Path = Field(
        Path("slimrec-state"), description="the split's state file and (unless log_dir) the logs"
    )
    log_dir: Path | None = Field(None, description="exposure and event logs; default: state_dir/logs")
    event_log: bool = Field(True, description="log every exposure and event (JSON Lines segments)")
    log_flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="logs reach the OS at least this often: what kill -9 can lose"
    )
    log_queue: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="records waiting for the log writer; past it: dropped, counted",
    )
    live_history: bool = Field(True, description="events enter the users' histories (off: logged only)")
    history_event_types: Annotated[list[str], NoDecode] | None = Field(
        None, description="event types that enter histories; unset = all"
    )
    history_max_per_user: int = Field(200, ge=1, le=100_000, description="live items kept per user")
    history_max_users: int = Field(
        100_000, ge=1, le=100_000_000, description="users with a live history in process (LRU)"
    )
    history_ttl_s: float = Field(
        30 * 86400, gt=0, description="Redis: a live history expires this long after its last event"
    )
    max_events_per_request: int = Field(1000, ge=1, le=100_000)
    max_events_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="body limit of POST /v1/events"
    )
    state_refresh_s: float = Field(
        1.0, gt=0, le=3600, description="how often a process re-reads the stored split (file or Redis)"
    )
    # Ray Serve (`--engine ray`, serving/ray_engine.py): the same app as an ingress deployment and
    # one model deployment per variant, on a local Ray cluster this command starts or one it joins.
    engine: Literal["uvicorn", "ray"] = Field(
        "uvicorn",
        description="uvicorn: this process serves (--workers N); ray: a Ray Serve application, "
        "an ingress deployment and one model deployment per variant",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (else RAY_ADDRESS; unset: start a local cluster)"
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, le=4096, description="CPUs of the local Ray cluster this command starts; default: all"
    )
    ingress_replicas: int = Field(
        1, ge=1, le=256, description="ingress replicas (more than one needs --state redis://...)"
    )
    model_replicas: Annotated[int | dict[str, int], NoDecode] = Field(
        1, description="replicas of each variant's model deployment: one number, or NAME=N,..."
    )
    ingress_max_replicas: int | None = Field(
        None,
        ge=1,
        le=256,
        description="autoscale the ingress between ingress_replicas and this many replicas (Ray Serve's "
        "autoscaling; more than one needs --state redis://...); unset: a fixed count",
    )
    model_max_replicas: int | None = Field(
        None,
        ge=1,
        le=256,
        description="autoscale each model deployment between its model_replicas and this many "
        "replicas (Ray Serve's autoscaling); unset: fixed counts",
    )
    ingress_target_ongoing: float = Field(
        16.0, gt=0, le=10_000, description="autoscaling: requests in flight per ingress replica Ray aims at"
    )
    model_target_ongoing: float = Field(
        2.0, gt=0, le=1_000, description="autoscaling: batches in flight per model replica Ray aims at"
    )
    ingress_num_cpus: float = Field(0.25, ge=0, le=256, description="Ray CPUs reserved per ingress replica")
    model_num_cpus: float = Field(0.25, ge=0, le=256, description="Ray CPUs reserved per model replica")
    inject_delay_ms: float = Field(
        0.0,
        ge=0,
        le=60_000,
        description="TESTS ONLY: sleep this long in every model call (slow-request tests); "
        "loopback binds only",
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file sits below env and kwargs; which file comes from a kwarg or the env.
        import os

        path = init_settings.init_kwargs.get("config_file") or os.environ.get("SLIMREC_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, value: Any) -> Any:
        return parse_pairs(value, "variants") if isinstance(value, str) else value

    @field_validator("split", mode="before")
    @classmethod
    def _parse_split(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        weights = {}
        for name, text in parse_pairs(value, "split").items():
            try:
                weights[name] = float(text)
            except (TypeError, ValueError):
                raise ValueError(f"split: weight of {name!r} must be a number, got {text!r}") from None
        return weights

    @field_validator("artifacts_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip().startswith("[") else value.split(",")
        return value

    @field_validator("history_event_types", mode="before")
    @classmethod
    def _parse_types(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip().startswith("[") else [t for t in value.split(",") if t]
        return value

    @field_validator("model_replicas", mode="before")
    @classmethod
    def _parse_model_replicas(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return int(text)
            try:
                return {name: int(n) for name, n in parse_pairs(text, "model_replicas").items()}
            except (TypeError, ValueError):
                raise ValueError(f"model_replicas: expected N or NAME=N,..., got {value!r}") from None
        return value

    @field_validator("state")
    @classmethod
    def _check_state_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"state: expected redis://HOST:PORT/DB (or rediss://, unix://), got {value!r}")
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        # SLIMREC_ADMIN_TOKEN="" means "no admin API", not "the empty string is the password".
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.variants:
            raise ValueError(
                "no variants: give at least one NAME=ARTIFACT_DIR (--variant / SLIMREC_VARIANTS)"
            )
        for name, path in self.variants.items():
            if not VARIANT_NAME.match(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
            if not path.is_dir():
                raise ValueError(f"variant {name!r}: artifact directory {path} does not exist")
        self.split = validate_split(self.split or {name: 1.0 for name in self.variants}, self.variants)
        if self.inject_delay_ms and not is_loopback(self.host):
            raise ValueError("inject_delay_ms is a test hook: only allowed when bound to a loopback address")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("admin_token: use at least 16 characters (e.g. `openssl rand -hex 32`)")
        self._check_replicas()
        if self.engine == "ray":
            self._check_ray_engine()
        return self

    def _check_replicas(self) -> None:
        replicas = self.model_replicas
        counts = replicas if isinstance(replicas, dict) else {name: replicas for name in self.variants}
        unknown = sorted(set(counts) - set(self.variants))
        if unknown:
            raise ValueError(f"model_replicas names unknown variant(s) {', '.join(map(repr, unknown))}")
        if any(n < 1 for n in counts.values()):
            raise ValueError(f"model_replicas: every count must be at least 1, got {self.model_replicas}")

    def _check_ray_engine(self) -> None:
        if self.workers > 1:
            raise ValueError(
                "workers: uvicorn's worker processes; with engine ray use ingress_replicas "
                "(--ingress-replicas)"
            )
        if self.model_process:
            raise ValueError(
                "model_process is for the uvicorn engine: with engine ray each model replica is a process"
            )
        most = max(self.ingress_replicas, self.ingress_max_replicas or 1)
        if most > 1 and not self.state:
            which = "ingress_replicas" if self.ingress_replicas > 1 else "ingress_max_replicas"
            raise ValueError(
                f"{which}={most} needs --state redis://HOST:PORT/DB: with the "
                "in-process store each ingress replica would keep its own split and live histories"
            )
        if self.ingress_max_replicas is not None and self.ingress_max_replicas < self.ingress_replicas:
            raise ValueError(
                f"ingress_max_replicas={self.ingress_max_replicas} is below "
                f"ingress_replicas={self.ingress_replicas}"
            )
        if self.model_max_replicas is not None:
            below = {
                name: n for name in self.variants if (n := self.replicas_of(name)) > self.model_max_replicas
            }
            if below:
                raise ValueError(
                    f"model_max_replicas={self.model_max_replicas} is below model_replicas for {below}"
                )

    def autoscaling_of(self, variant: str | None) -> dict[str, Any] | None:
        """Ray Serve's autoscaling_config for a variant's model deployment (None: the ingress);
        None when that deployment has a fixed replica count."""
        if variant is None:
            least, most, target = (
                self.ingress_replicas,
                self.ingress_max_replicas,
                self.ingress_target_ongoing,
            )
        else:
            least, most, target = (
                self.replicas_of(variant),
                self.model_max_replicas,
                self.model_target_ongoing,
            )
        if most is None:
            return None
        return {"min_replicas": least, "max_replicas": most, "target_ongoing_requests": target}

    def replicas_of(self, variant: str) -> int:
        """Model replicas of a variant under the ray engine (1 where a mapping leaves it out)."""
        if isinstance(self.model_replicas, dict):
            return self.model_replicas.get(variant, 1)
        return self.model_replicas

    @cached_property  # asked on every request that carries the header
    def overrides_allowed(self) -> bool:
        """Whether X-Slimrec-Variant is honoured: the setting, else only on a loopback bind."""
        return is_loopback(self.host) if self.allow_variant_override is None else self.allow_variant_override

    @property
    def batch_wait_s(self) -> float:
        """How long a batch waits to fill: batch_max_wait_ms if set, else 2 ms in one process
        and none with `workers` > 1. Waiting makes bigger batches, less CPU per request, where
        one process is the bottleneck. Each of N workers sees 1/N of the concurrent requests,
        and the wait idles its core: ml-100k compressed, wrk 1x16, two workers, waiting 2 ms:
        1.45-1.52 cores, 3,814-4,513 RPS (6 runs); not waiting: 1.68-1.72 cores, 4,105-4,686
        RPS (8 runs), 363-419 us CPU per request against 333-386.
        """
        if self.batch_max_wait_ms is not None:
            return self.batch_max_wait_ms / 1000
        return 0.002 if self.workers == 1 else 0.0

    @property
    def logs_path(self) -> Path:
        return self.log_dir if self.log_dir is not None else self.state_dir / "logs"

    @property
    def split_file(self) -> Path:
        return self.state_dir / "split.json"

    @property
    def reload_roots(self) -> list[Path]:
        """Directories that admin reloads may load artifacts from (resolved; relative paths use the first)."""
        roots = self.artifacts_roots or [path.resolve().parent for path in self.variants.values()]
        return list(dict.fromkeys(Path(root).resolve() for root in roots))  # deduplicated, in order

    def to_env(self) -> dict[str, str]:
        """The settings as SLIMREC_* variables, so uvicorn worker processes rebuild the same Settings."""
        env = {}
        for name, value in self.model_dump(mode="json", exclude={"config_file"}).items():
            if value is None:
                continue
            env[f"SLIMREC_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        if self.admin_token is not None:
            env["SLIMREC_ADMIN_TOKEN"] = self.admin_token.get_secret_value()
        return env


def validate_split(weights: dict[str, float], variants) -> dict[str, float]:
    """Check weights against the variant names; variants left out get weight 0.

    Raises:
        ValueError: an unknown variant, a negative or non-finite weight, or weights summing to 0.
    """
    unknown = sorted(set(weights) - set(variants))
    if unknown:
        raise ValueError(
            f"split names unknown variant(s) {', '.join(map(repr, unknown))}; "
            f"variants are {', '.join(map(repr, variants))}"
        )
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"split: weight of {name!r} must be a finite number >= 0, got {weight}")
    if sum(weights.values()) <= 0:
        raise ValueError("split: weights must sum to more than 0")
    return {name: float(weights.get(name, 0.0)) for name in variants}
