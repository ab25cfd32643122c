"""Where the providers are and how to authenticate to them: real vendors or our emulators.

:func:`resolve_endpoints` reads, for each vendor section of ``[providers]``, its
address and secrets: secrets never live in the TOML file; a ``*_env`` field names
the environment variable, a ``*_file`` field the key file. A vendor whose address
is unset is played by its loopback emulator when ``[emulators] enabled`` is true
(``make run``, the chaos scenarios), and is a configuration error otherwise.

:func:`open_emulators` starts those emulators (``providers.emulators``), each on
a free port of ``[emulators] host``, with credentials generated for both sides
(an API key, a Twilio auth token, an FCM service account and its RSA key, an
APNs ES256 key, the webhook secrets), and returns the :class:`Endpoints` the
adapters use. Receipts and bounces need the daemon's own address, which is known
only once its HTTP server listens: :meth:`Emulated.point_receipts_at` tells the
emulators then.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from config import ConfigError, ConfigProblem, TriageConfig
from providers.emulators.base import Emulator, EmulatorServer, serve_emulator
from providers.emulators.jitsi import JitsiBridgeEmulator
from providers.emulators.push import (
    ApnsEmulator,
    FcmEmulator,
    generate_apns_key,
    generate_service_account,
)
from providers.emulators.sms import GhasiEmulator, TwilioEmulator
from providers.emulators.smtp import SmtpEmulator, serve_smtp_emulator
from providers.fcm import ServiceAccount
from providers.ghasi import GhasiWire
from providers.presigned import load_secret

__all__ = ["Emulated", "Endpoints", "ghasi_wire", "open_emulators", "resolve_endpoints"]

#: Where the emulators post receipts and bounces, under the daemon's address.
DLR_PATH = "/webhooks/dlr/{provider}"
BOUNCE_PATH = "/webhooks/bounces/{provider}"


def ghasi_wire(config: TriageConfig) -> GhasiWire:
    """The Ghasi gateway's wire shape from ``[providers.ghasi]``: every wire field has
    its config key of the same name (a test holds them equal)."""
    g = config.providers.ghasi
    return GhasiWire(**{name: getattr(g, name) for name in GhasiWire.__struct_fields__})


@dataclass(frozen=True)
class Endpoints:
    """Addresses and credentials of every provider, resolved."""

    ghasi_url: str
    ghasi_api_key: str
    ghasi_receipt_secret: str
    twilio_url: str
    twilio_auth_token: str
    fcm_url: str
    fcm_account: ServiceAccount
    fcm_feedback_url: str
    apns_url: str
    apns_private_key: str
    apns_feedback_url: str
    smtp_host: str
    smtp_port: int
    smtp_username: str | None
    smtp_password: str | None
    smtp_bounce_secret: str
    #: The pre-signed upload URLs' HMAC key ([uploads]); None: a random one per process.
    upload_secret: bytes | None = None
    #: the videobridge nodes of ``[jitsi] nodes``: (name, base URL)
    jitsi_nodes: tuple[tuple[str, str], ...] = ()


def _problem(path: str, message: str) -> ConfigProblem:
    return ConfigProblem(source="<config>", line=None, path=path, message=message)


def resolve_endpoints(config: TriageConfig, env: Mapping[str, str] | None = None) -> Endpoints:
    """The real providers' endpoints and secrets; :class:`ConfigError` names each gap."""
    env = os.environ if env is None else env
    p = config.providers
    problems: list[ConfigProblem] = []

    def need_url(path: str, value: str | None) -> str:
        if not value:
            problems.append(
                _problem(path, "unset, and [emulators] is not enabled: set the provider's address")
            )
            return ""
        return value

    def secret(path: str, name: str | None, *, required: bool = True) -> str | None:
        if name is None:
            return None
        value = env.get(name)
        if not value and required:
            problems.append(_problem(path, f"environment variable {name} is not set"))
        return value or None

    def read(path: str, file: str | None) -> str:
        if not file:
            problems.append(_problem(path, "unset: the key file is required for a real provider"))
            return ""
        try:
            return Path(file).read_text()
        except OSError as exc:
            problems.append(_problem(path, f"cannot read {file}: {exc.strerror}"))
            return ""

    ghasi_url = need_url("$.providers.ghasi.base_url", p.ghasi.base_url)
    ghasi_key = secret("$.providers.ghasi.api_key_env", p.ghasi.api_key_env) or ""
    ghasi_receipts = secret("$.providers.ghasi.receipt_secret_env", p.ghasi.receipt_secret_env)
    twilio_url = need_url("$.providers.twilio.base_url", p.twilio.base_url)
    twilio_token = secret("$.providers.twilio.auth_token_env", p.twilio.auth_token_env) or ""
    fcm_url = need_url("$.providers.fcm.base_url", p.fcm.base_url)
    account_json = read("$.providers.fcm.service_account_file", p.fcm.service_account_file)
    apns_url = need_url("$.providers.apns.base_url", p.apns.base_url)
    apns_key = read("$.providers.apns.key_file", p.apns.key_file)
    smtp_host = need_url("$.providers.smtp.host", p.smtp.host)
    bounce = secret("$.providers.smtp.bounce_secret_env", p.smtp.bounce_secret_env) or ""
    username = secret("$.providers.smtp.username_env", p.smtp.username_env)
    password = secret("$.providers.smtp.password_env", p.smtp.password_env)
    account: ServiceAccount | None = None
    if account_json:
        try:
            account = ServiceAccount.from_json(account_json)
        except (ValueError, TypeError) as exc:
            problems.append(
                _problem("$.providers.fcm.service_account_file", f"not a service account: {exc}")
            )
    upload_secret: bytes | None = None
    if config.uploads.enabled:
        u = config.uploads
        where = "$.uploads.signing_secret_" + ("file" if u.signing_secret_file else "env")
        try:
            upload_secret = load_secret(
                file=u.signing_secret_file, env_name=u.signing_secret_env, env=env
            )
        except ValueError as exc:
            problems.append(_problem(where, str(exc)))
        else:
            if upload_secret is None:
                problems.append(
                    _problem(where, f"environment variable {u.signing_secret_env} is not set")
                )
    jitsi_nodes: list[tuple[str, str]] = []
    for index, node in enumerate(config.jitsi.nodes):
        jitsi_nodes.append((node.name, need_url(f"$.jitsi.nodes[{index}].url", node.url)))
    if problems:
        raise ConfigError(problems)
    assert account is not None
    return Endpoints(
        upload_secret=upload_secret,
        ghasi_url=ghasi_url,
        ghasi_api_key=ghasi_key,
        ghasi_receipt_secret=ghasi_receipts or "",
        twilio_url=twilio_url,
        twilio_auth_token=twilio_token,
        fcm_url=fcm_url,
        fcm_account=account,
        fcm_feedback_url=p.fcm.feedback_url or fcm_url,
        apns_url=apns_url,
        apns_private_key=apns_key,
        apns_feedback_url=p.apns.feedback_url or apns_url,
        smtp_host=smtp_host,
        smtp_port=p.smtp.port,
        smtp_username=username,
        smtp_password=password,
        smtp_bounce_secret=bounce,
        jitsi_nodes=tuple(jitsi_nodes),
    )


@dataclass
class Emulated:
    """The running emulators and the endpoints that reach them."""

    endpoints: Endpoints
    ghasi: GhasiEmulator
    twilio: TwilioEmulator
    fcm: FcmEmulator
    apns: ApnsEmulator
    smtp: SmtpEmulator
    servers: dict[str, EmulatorServer] = field(default_factory=dict)
    #: the videobridge emulators, by node name (nodes of [jitsi] without a url)
    bridges: dict[str, JitsiBridgeEmulator] = field(default_factory=dict)

    @property
    def http(self) -> tuple[Emulator, ...]:
        return (self.ghasi, self.twilio, self.fcm, self.apns)

    def point_receipts_at(self, base_url: str) -> None:
        """Post Ghasi receipts and SMTP bounces to the daemon at ``base_url``
        (Twilio's go to the StatusCallback each message names)."""
        base = base_url.rstrip("/")
        self.ghasi.receipt_url = base + DLR_PATH.format(provider="ghasi")
        self.smtp.bounce_url = base + BOUNCE_PATH.format(provider="smtp")

    def _counters(self) -> list[Counter[str]]:
        return [*(e.accepted for e in self.http), self.smtp.accepted]

    def received(self, key: str) -> int:
        """How often any provider took a message with idempotency key ``key``."""
        return sum(counter[key] for counter in self._counters())

    def duplicates(self) -> int:
        """Messages taken more than once for one idempotency key, across every provider."""
        total: Counter[str] = Counter()
        for counter in self._counters():
            total.update(counter)
        return sum(n - 1 for n in total.values() if n > 1)


@asynccontextmanager
async def open_emulators(config: TriageConfig) -> AsyncIterator[Emulated]:
    """Start every provider's emulator on ``[emulators] host`` (free ports) until the block exits."""
    settings = config.emulators
    p = config.providers
    host = settings.host
    delay = settings.receipt_delay_s
    ghasi_key = secrets.token_urlsafe(24)
    ghasi_secret = secrets.token_urlsafe(24)
    twilio_token = secrets.token_hex(16)
    bounce_secret = secrets.token_urlsafe(24)
    apns_private, apns_public = generate_apns_key()
    async with AsyncExitStack() as stack:
        ghasi = GhasiEmulator(
            api_key=ghasi_key,
            wire=ghasi_wire(config),  # shaped like the adapter, by the same config
            receipt_secret=ghasi_secret,
            receipt_delay_s=delay,
        )
        twilio = TwilioEmulator(
            account_sid=p.twilio.account_sid, auth_token=twilio_token, receipt_delay_s=delay
        )
        apns = ApnsEmulator(
            keys={p.apns.key_id: (p.apns.team_id, apns_public)},
            topics=frozenset({p.apns.topic}),
            subscription=p.apns.feedback_subscription,
            receipt_delay_s=delay,
        )
        servers: dict[str, EmulatorServer] = {}
        for name, emulator in (("ghasi", ghasi), ("twilio", twilio), ("apns", apns)):
            servers[name] = await stack.enter_async_context(serve_emulator(emulator, host=host))
        # FCM's token endpoint lives on the emulator itself: the service account
        # names it, so the server must listen before the account is made.
        account, public = generate_service_account(
            project_id=p.fcm.project_id,
            client_email=f"triage@{p.fcm.project_id}.iam.gserviceaccount.com",
            token_uri="http://placeholder.invalid/token",
        )
        fcm = FcmEmulator(
            project_id=p.fcm.project_id,
            client_email=account.client_email,
            public_key=public,
            subscription=p.fcm.feedback_subscription,
            receipt_delay_s=delay,
        )
        servers["fcm"] = await stack.enter_async_context(serve_emulator(fcm, host=host))
        fcm_server_url = servers["fcm"].url
        account = ServiceAccount(
            project_id=account.project_id,
            client_email=account.client_email,
            private_key=account.private_key,
            token_uri=fcm_server_url + fcm.token_path,
            private_key_id=account.private_key_id,
        )
        smtp = SmtpEmulator(bounce_secret=bounce_secret, bounce_delay_s=delay)
        await stack.enter_async_context(serve_smtp_emulator(smtp, host=host, port=0))
        bridges: dict[str, JitsiBridgeEmulator] = {}
        jitsi_nodes: list[tuple[str, str]] = []
        for node in config.jitsi.nodes:
            if node.url is not None:
                jitsi_nodes.append((node.name, node.url))
                continue
            bridge = bridges[node.name] = JitsiBridgeEmulator(node.name)
            server = await stack.enter_async_context(serve_emulator(bridge, host=host))
            servers[f"jitsi_{node.name}"] = server
            jitsi_nodes.append((node.name, server.url))
        http_emulators: tuple[Emulator, ...] = (ghasi, twilio, fcm, apns)
        for each in http_emulators:
            each.receipt_attempts = settings.receipt_attempts
            each.receipt_retry_s = settings.receipt_retry_s
        endpoints = Endpoints(
            ghasi_url=servers["ghasi"].url,
            ghasi_api_key=ghasi_key,
            ghasi_receipt_secret=ghasi_secret,
            twilio_url=servers["twilio"].url,
            twilio_auth_token=twilio_token,
            fcm_url=fcm_server_url,
            fcm_account=account,
            fcm_feedback_url=fcm_server_url,
            apns_url=servers["apns"].url,
            apns_private_key=apns_private,
            apns_feedback_url=servers["apns"].url,
            smtp_host=host,
            smtp_port=smtp.port,
            smtp_username=None,
            smtp_password=None,
            smtp_bounce_secret=bounce_secret,
            jitsi_nodes=tuple(jitsi_nodes),
        )
        yield Emulated(
            endpoints=endpoints,
            ghasi=ghasi,
            twilio=twilio,
            fcm=fcm,
            apns=apns,
            smtp=smtp,
            servers=servers,
            bridges=bridges,
        )
