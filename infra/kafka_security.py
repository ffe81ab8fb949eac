"""Kafka security for every client of the project, built in one place (docs/operations.md
"Security: Kafka").

A ``KafkaSecurity`` holds the security protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL), the
SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) with a user name and a *password file*,
and the TLS files (a CA, a client certificate and its key). It refuses contradictory settings
when made (``KafkaSecurityError``), and turns itself into what each client library takes:

- ``kafka_python_kwargs()``: kafka-python's ``security_protocol``, ``sasl_*``, ``ssl_context``
  (``infra.kafka``'s clients add them to every client they make);
- ``aiokafka_kwargs()``: the same for aiokafka's producers and consumers;
- ``faust_credentials()``: faust's ``broker_credentials`` (``faust.auth``), which faust's
  transport turns into the aiokafka settings of the worker's consumer and producer.

The password is read from its file each time client settings are built (a new client after a
rotation takes the new one); it never appears in arguments, environment values or ``repr``.

Where the settings come from: a process has one active setting (``active()``), set by the
``hisam`` commands from their ``--kafka-*`` options (``add_arguments`` / ``from_args`` /
``configure``), else read from the environment (``HISAM_KAFKA_SECURITY_PROTOCOL`` and the
other ``ENV`` names). ``configure`` also exports the setting's environment (names and paths
only), so the processes a command starts (the run loop's worker and trainer, benchmark
workers) use the same.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# field -> (environment variable, command-line option)
ENV: dict[str, str] = {
    "protocol": "HISAM_KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "HISAM_KAFKA_SASL_MECHANISM",
    "username": "HISAM_KAFKA_USERNAME",
    "username_file": "HISAM_KAFKA_USERNAME_FILE",
    "password_file": "HISAM_KAFKA_PASSWORD_FILE",
    "ca_file": "HISAM_KAFKA_TLS_CA",
    "cert_file": "HISAM_KAFKA_TLS_CERT",
    "key_file": "HISAM_KAFKA_TLS_KEY",
}
OPTIONS: dict[str, str] = {
    "protocol": "--kafka-security-protocol",
    "sasl_mechanism": "--kafka-sasl-mechanism",
    "username": "--kafka-username",
    "username_file": "--kafka-username-file",
    "password_file": "--kafka-password-file",
    "ca_file": "--kafka-tls-ca",
    "cert_file": "--kafka-tls-cert",
    "key_file": "--kafka-tls-key",
}
_PATHS = ("username_file", "password_file", "ca_file", "cert_file", "key_file")


class KafkaSecurityError(ValueError):
    """Contradictory, incomplete or unreadable Kafka security settings."""


@dataclass(frozen=True)
class KafkaSecurity:
    """How the project's Kafka clients authenticate and encrypt (module docstring)."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password_file: Path | None = None
    username_file: Path | None = None  # instead of username: the user read from a file (a mounted Secret)
    ca_file: Path | None = None  # None with TLS: the system's trusted CAs
    cert_file: Path | None = None  # client certificate (mutual TLS), with key_file
    key_file: Path | None = None

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value) if str(value) else None)
        protocol = (self.protocol or "PLAINTEXT").upper()
        object.__setattr__(self, "protocol", protocol)
        if self.sasl_mechanism:
            object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())
        self._check()

    def _check(self) -> None:
        opt = OPTIONS
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"{opt['protocol']} {self.protocol!r}: one of {', '.join(PROTOCOLS)}")
        if self.sasl:
            if self.sasl_mechanism is None:
                raise KafkaSecurityError(f"{self.protocol} needs {opt['sasl_mechanism']} ({', '.join(MECHANISMS)})")
            if self.sasl_mechanism not in MECHANISMS:
                raise KafkaSecurityError(
                    f"{opt['sasl_mechanism']} {self.sasl_mechanism!r}: one of {', '.join(MECHANISMS)}"
                )
            if self.username and self.username_file:
                raise KafkaSecurityError(f"{opt['username']} or {opt['username_file']}, not both")
            missing = [opt[n] for n in ("username", "password_file") if not getattr(self, n)]
            if self.username_file:
                missing = missing[1:]
            if missing:
                raise KafkaSecurityError(f"{self.protocol} needs {' and '.join(missing)}")
        else:
            names = ("sasl_mechanism", "username", "username_file", "password_file")
            given = [opt[n] for n in names if getattr(self, n)]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} given but {opt['protocol']} is {self.protocol}, without SASL "
                    "(use SASL_SSL, or SASL_PLAINTEXT)"
                )
        if not self.tls:
            given = [opt[n] for n in ("ca_file", "cert_file", "key_file") if getattr(self, n)]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} given but {opt['protocol']} is {self.protocol}, without TLS (use SSL or SASL_SSL)"
                )
        if (self.cert_file is None) != (self.key_file is None):
            raise KafkaSecurityError(f"{opt['cert_file']} and {opt['key_file']} go together")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    # -- sources -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        env = os.environ if environ is None else environ
        values = {name: env.get(var) or None for name, var in ENV.items()}
        values["protocol"] = values["protocol"] or "PLAINTEXT"
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KafkaSecurity:
        """From the options ``add_arguments`` added (their defaults are the environment's)."""
        return cls(**{name: getattr(args, "kafka_" + name) for name in ENV})

    def env(self) -> dict[str, str]:
        """The environment that gives this setting to another process (names and paths only)."""
        return {ENV[n]: str(getattr(self, n)) for n in ENV if getattr(self, n) is not None}

    def args(self) -> list[str]:
        """The command-line options that give this setting to a ``hisam`` command (no secret)."""
        out: list[str] = []
        for name, option in OPTIONS.items():
            value = getattr(self, name)
            if value is not None and not (name == "protocol" and value == "PLAINTEXT"):
                out += [option, str(value)]
        return out

    # -- what the clients take -------------------------------------------------------------

    def user(self) -> str:
        """The SASL user: ``username``, else read from ``username_file`` now."""
        if self.username or self.username_file is None:
            return self.username or ""
        try:
            user = self.username_file.read_text().strip()
        except OSError as e:
            raise KafkaSecurityError(f"{OPTIONS['username_file']} {self.username_file}: {e.strerror}") from e
        if not user:
            raise KafkaSecurityError(f"{OPTIONS['username_file']} {self.username_file} is empty")
        return user

    def password(self) -> str:
        """The SASL password, read from ``password_file`` now (a trailing newline dropped)."""
        if self.password_file is None:
            raise KafkaSecurityError(f"no {OPTIONS['password_file']}")
        try:
            pw = self.password_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise KafkaSecurityError(f"{OPTIONS['password_file']} {self.password_file}: {e.strerror}") from e
        if not pw:
            raise KafkaSecurityError(f"{OPTIONS['password_file']} {self.password_file} is empty")
        return pw

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context (server certificate and host name checked, TLS 1.2 at least);
        None without TLS."""
        if not self.tls:
            return None
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise KafkaSecurityError(f"{OPTIONS[name]} {path}: no such file")
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except ssl.SSLError as e:
            raise KafkaSecurityError(f"Kafka TLS files ({self.ca_file}, {self.cert_file}, {self.key_file}): {e}") from e
        return ctx

    def _sasl_kwargs(self) -> dict[str, Any]:
        if not self.sasl:
            return {}
        return {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.user(),
            "sasl_plain_password": self.password(),
        }

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """kafka-python's keyword arguments (KafkaConsumer, KafkaProducer, KafkaAdminClient)."""
        if self.protocol == "PLAINTEXT":
            return {}
        kw: dict[str, Any] = {"security_protocol": self.protocol, **self._sasl_kwargs()}
        if self.tls:
            kw["ssl_context"] = self.ssl_context()
            kw["ssl_check_hostname"] = True
        return kw

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """aiokafka's keyword arguments (AIOKafkaProducer, AIOKafkaConsumer): kafka-python's, whose
        ``ssl_check_hostname`` aiokafka does not take (its SSL context checks the name)."""
        kw = self.kafka_python_kwargs()
        kw.pop("ssl_check_hostname", None)
        return kw

    def faust_credentials(self):
        """faust's ``broker_credentials`` (None for PLAINTEXT)."""
        if self.protocol == "PLAINTEXT":
            return None
        from faust.auth import SASLCredentials, SSLCredentials

        if self.sasl:
            # SASLCredentials is SASL_SSL exactly when it has a TLS context.
            return SASLCredentials(
                username=self.user(),
                password=self.password(),
                ssl_context=self.ssl_context(),
                mechanism=self.sasl_mechanism,
            )
        return SSLCredentials(self.ssl_context())


# -- the process's setting ------------------------------------------------------------------

_active: KafkaSecurity | None = None


def active() -> KafkaSecurity:
    """The process's setting: the one ``configure`` set, else the environment's."""
    return _active if _active is not None else KafkaSecurity.from_env()


def configure(security: KafkaSecurity, export: bool = True) -> None:
    """Make ``security`` the process's setting; ``export``: also the environment's (for the
    processes it starts)."""
    global _active
    _active = security
    if export:
        for var in ENV.values():
            os.environ.pop(var, None)
        os.environ.update(security.env())
    if security.protocol == "SASL_PLAINTEXT":
        log.warning("Kafka SASL over PLAINTEXT: the traffic (and with PLAIN, the password) is not encrypted")


@contextlib.contextmanager
def using(security: KafkaSecurity) -> Iterator[KafkaSecurity]:
    """``security`` as the process's setting (not exported) for the ``with`` body."""
    global _active
    before = _active
    _active = security
    try:
        yield security
    finally:
        _active = before


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--kafka-*`` security options, defaults from the environment (``ENV``)."""
    g = parser.add_argument_group("Kafka security (docs/operations.md, Security: Kafka)")
    env = os.environ
    g.add_argument(
        OPTIONS["protocol"],
        dest="kafka_protocol",
        type=str.upper,
        choices=PROTOCOLS,
        default=(env.get(ENV["protocol"]) or "PLAINTEXT").upper(),
        help=f"${ENV['protocol']}; SSL or SASL_SSL for TLS",
    )
    g.add_argument(
        OPTIONS["sasl_mechanism"],
        dest="kafka_sasl_mechanism",
        type=str.upper,
        choices=MECHANISMS,
        default=env.get(ENV["sasl_mechanism"]) or None,
        help=f"${ENV['sasl_mechanism']} (SASL_* protocols)",
    )
    g.add_argument(
        OPTIONS["username"], dest="kafka_username", default=env.get(ENV["username"]) or None, help="SASL user"
    )
    g.add_argument(
        OPTIONS["username_file"],
        dest="kafka_username_file",
        type=Path,
        default=env.get(ENV["username_file"]) or None,
        help="file holding the SASL user (instead of --kafka-username)",
    )
    g.add_argument(
        OPTIONS["password_file"],
        dest="kafka_password_file",
        type=Path,
        default=env.get(ENV["password_file"]) or None,
        help="file holding the SASL password (never the password itself)",
    )
    for name, what in (("ca_file", "CA file"), ("cert_file", "client certificate"), ("key_file", "its key")):
        g.add_argument(
            OPTIONS[name],
            dest="kafka_" + name,
            type=Path,
            default=env.get(ENV[name]) or None,
            help=f"TLS {what} (${ENV[name]})",
        )


def configure_from_args(args: argparse.Namespace) -> KafkaSecurity:
    """``configure`` with the setting of a command's ``--kafka-*`` options; a contradictory or
    unreadable one exits (status 1) with the message."""
    try:
        security = KafkaSecurity.from_args(args)
        security.kafka_python_kwargs()  # unreadable files fail now, not in the first client
    except KafkaSecurityError as e:
        raise SystemExit(f"error: {e}") from None
    configure(security)
    return security
