"""SMPP connections and routes, from ``DISPATCHER_SMPP`` (JSON) or ``DISPATCHER_SMPP_FILE``.

Validated once, at startup: a bad value stops the process with a message that
names the field (``carriers.uk.connections[0].port: ...``). Passwords are
never part of a message, a repr or a log line: :class:`Connection` hides them.
See the README's SMPP section for the format.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dispatcher.channels.smpp.pdu import ALPHABETS, DEFAULT_SOURCE_RULES


class SmppConfigError(ValueError):
    """A connection or route setting that cannot be used; the message names the field."""


BIND_MODES = ("transceiver", "transmitter_receiver")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Connection:
    """One SMPP account at an SMSC; ``binds`` sessions of it are kept open."""

    name: str
    carrier: str
    host: str
    port: int
    system_id: str
    password: str = field(repr=False)
    system_type: str = ""
    tls: bool = False
    bind: str = "transceiver"
    window: int = 50
    # Messages (submit_sm) per second across every connector, 0 for no limit.
    throughput: float = 0.0


@dataclass(frozen=True)
class Carrier:
    name: str
    connections: tuple[Connection, ...]
    data_coding: int = 0
    # What data_coding 0 means at this SMSC: GSM 03.38 (the usual), Latin-1 or ASCII.
    alphabet: str = "gsm7"
    source_rules: dict[str, tuple[int, int]] = field(
        default_factory=lambda: dict(DEFAULT_SOURCE_RULES)
    )
    short_code_max: int = 8
    registered_delivery: bool = True


@dataclass(frozen=True)
class Route:
    """Messages on ``channel`` to numbers starting with ``prefix`` go to ``carrier``."""

    channel: str
    prefix: str
    carrier: str
    account: str | None = None


@dataclass(frozen=True)
class SmppConfig:
    carriers: dict[str, Carrier]
    routes: tuple[Route, ...]
    # Seconds a submit waits for its submit_sm_resp before its outcome is unknown.
    response_timeout: float = 10.0
    # Seconds a worker waits for the connector's answer to a hand-off.
    request_timeout: float = 30.0
    # Seconds a throttled connection (ESME_RTHROTTLED, ESME_RMSGQFUL) pauses first.
    throttle_pause: float = 1.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0

    @property
    def connections(self) -> list[Connection]:
        return [c for carrier in self.carriers.values() for c in carrier.connections]

    def redacted(self) -> dict[str, Any]:
        """The configuration as shown to operators: everything but the passwords."""
        return {
            "carriers": {
                name: {
                    "connections": [
                        {
                            "name": c.name,
                            "host": c.host,
                            "port": c.port,
                            "tls": c.tls,
                            "system_id": c.system_id,
                            "bind": c.bind,
                            "window": c.window,
                            "throughput": c.throughput,
                        }
                        for c in carrier.connections
                    ],
                    "data_coding": carrier.data_coding,
                    "alphabet": carrier.alphabet,
                }
                for name, carrier in self.carriers.items()
            },
            "routes": [r.__dict__ for r in self.routes],
        }


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise SmppConfigError(f"{where}.{key}: required")
    return _typed(obj[key], kind, f"{where}.{key}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise SmppConfigError(f"{where}: expected {kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise SmppConfigError(f"{where}: expected {kinds[0].__name__}")
    return value


def _optional(obj: Mapping[str, Any], key: str, kind: Any, default: Any, where: str) -> Any:
    return _typed(obj[key], kind, f"{where}.{key}") if key in obj else default


def _positive(value: float, where: str, *, zero: bool = False) -> float:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise SmppConfigError(f"{where}: must be {'zero or ' if zero else ''}a positive number")
    return float(value)


def _connection(raw: Any, carrier: str, where: str, env: Mapping[str, str]) -> Connection:
    if not isinstance(raw, dict):
        raise SmppConfigError(f"{where}: expected an object")
    name = _require(raw, "name", str, where)
    if not _NAME.match(name):
        raise SmppConfigError(f"{where}.name: letters, digits, '.', '_' or '-' (1-64)")
    port = _require(raw, "port", int, where)
    if not 1 <= port <= 65535:
        raise SmppConfigError(f"{where}.port: must be a TCP port (1-65535)")
    if "password_env" in raw:
        var = _typed(raw["password_env"], str, f"{where}.password_env")
        if var not in env:
            raise SmppConfigError(f"{where}.password_env: the variable {var} is not set")
        password = env[var]
    else:
        password = _require(raw, "password", str, where)
    # SMPP 3.4 caps: system_id 16, password 9, system_type 13 octets (with the NUL).
    system_id = _require(raw, "system_id", str, where)
    if not 1 <= len(system_id) <= 15:
        raise SmppConfigError(f"{where}.system_id: 1 to 15 characters")
    if len(password) > 8:
        raise SmppConfigError(f"{where}.password: at most 8 characters (SMPP 3.4)")
    system_type = _optional(raw, "system_type", str, "", where)
    if len(system_type) > 12:
        raise SmppConfigError(f"{where}.system_type: at most 12 characters")
    bind = _optional(raw, "bind", str, "transceiver", where)
    if bind not in BIND_MODES:
        raise SmppConfigError(f"{where}.bind: one of {', '.join(BIND_MODES)}")
    window = _optional(raw, "window", int, 50, where)
    if not 1 <= window <= 1000:
        raise SmppConfigError(f"{where}.window: 1 to 1000 outstanding submits")
    host = _require(raw, "host", str, where)
    if not host:
        raise SmppConfigError(f"{where}.host: required")
    # Every field of Connection but the carrier (its key), and password_env.
    known = {f.name for f in fields(Connection)} - {"carrier"} | {"password_env"}
    for key in raw:
        if key not in known:
            raise SmppConfigError(f"{where}.{key}: unknown setting")
    throughput = _optional(raw, "throughput", (int, float), 0, where)
    checked = {
        "name": name,
        "host": host,
        "port": port,
        "system_id": system_id,
        "password": password,
        "system_type": system_type,
        "tls": _optional(raw, "tls", bool, False, where),
        "bind": bind,
        "window": window,
        "throughput": _positive(throughput, f"{where}.throughput", zero=True),
    }
    return Connection(carrier=carrier, **checked)


def _carrier(name: str, raw: Any, env: Mapping[str, str]) -> Carrier:
    where = f"carriers.{name}"
    if not _NAME.match(name):
        raise SmppConfigError(f"{where}: carrier names use letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise SmppConfigError(f"{where}: expected an object")
    conns = _require(raw, "connections", list, where)
    if not conns:
        raise SmppConfigError(f"{where}.connections: at least one connection")
    connections = tuple(
        _connection(c, name, f"{where}.connections[{i}]", env) for i, c in enumerate(conns)
    )
    data_coding = _optional(raw, "data_coding", int, 0, where)
    if data_coding not in (0, 8):
        raise SmppConfigError(f"{where}.data_coding: 0 (default alphabet) or 8 (UCS-2)")
    alphabet = _optional(raw, "alphabet", str, "gsm7", where)
    if alphabet not in ALPHABETS:
        raise SmppConfigError(f"{where}.alphabet: one of {', '.join(ALPHABETS)}")
    rules = dict(DEFAULT_SOURCE_RULES)
    for kind, value in _optional(raw, "source_addr", dict, {}, where).items():
        spot = f"{where}.source_addr.{kind}"
        if kind not in rules:
            raise SmppConfigError(f"{spot}: one of {', '.join(rules)}")
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not all(0 <= v <= 255 for v in value)
        ):
            raise SmppConfigError(f"{spot}: [ton, npi], two integers 0-255")
        rules[kind] = (value[0], value[1])
    return Carrier(
        name=name,
        connections=connections,
        data_coding=data_coding,
        alphabet=alphabet,
        source_rules=rules,
        short_code_max=_optional(raw, "short_code_max", int, 8, where),
        registered_delivery=_optional(raw, "registered_delivery", bool, True, where),
    )


def parse(raw: Any, *, env: Mapping[str, str] | None = None) -> SmppConfig:
    """A checked configuration from its JSON form."""
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise SmppConfigError("smpp: expected a JSON object with carriers and routes")
    carriers_raw = _require(raw, "carriers", dict, "smpp")
    if not carriers_raw:
        raise SmppConfigError("smpp.carriers: at least one carrier")
    carriers = {name: _carrier(name, c, env) for name, c in carriers_raw.items()}
    names = [c.name for carrier in carriers.values() for c in carrier.connections]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SmppConfigError(f"connections: names must be unique ({', '.join(dupes)})")
    routes = []
    for i, r in enumerate(_optional(raw, "routes", list, [], "smpp")):
        where = f"routes[{i}]"
        if not isinstance(r, dict):
            raise SmppConfigError(f"{where}: expected an object")
        carrier = _require(r, "carrier", str, where)
        if carrier not in carriers:
            raise SmppConfigError(f"{where}.carrier: no carrier named {carrier!r}")
        prefix = _optional(r, "prefix", str, "", where)
        if prefix and not re.match(r"^\+?[0-9]*$", prefix):
            raise SmppConfigError(f"{where}.prefix: digits, optionally after '+'")
        routes.append(
            Route(
                channel=_optional(r, "channel", str, "sms", where),
                prefix=prefix if not prefix or prefix.startswith("+") else "+" + prefix,
                carrier=carrier,
                account=_optional(r, "account", str, None, where),
            )
        )
    if not routes:
        # One carrier and no table: everything on sms goes there.
        routes = [Route(channel="sms", prefix="", carrier=name) for name in carriers]
    timeouts = {}
    for key, default in (
        ("response_timeout", 10.0),
        ("request_timeout", 30.0),
        ("throttle_pause", 1.0),
        ("reconnect_min", 0.5),
        ("reconnect_max", 30.0),
    ):
        timeouts[key] = _positive(_optional(raw, key, (int, float), default, "smpp"), f"smpp.{key}")
    if timeouts["request_timeout"] <= timeouts["response_timeout"]:
        raise SmppConfigError("smpp.request_timeout: must exceed response_timeout")
    return SmppConfig(carriers=carriers, routes=tuple(routes), **timeouts)


def load(
    *, inline: dict[str, Any], path: str = "", env: Mapping[str, str] | None = None
) -> SmppConfig:
    """The configuration from ``DISPATCHER_SMPP_FILE`` or the inline ``DISPATCHER_SMPP``."""
    if path:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SmppConfigError(
                f"DISPATCHER_SMPP_FILE: cannot read {path}: {exc.strerror}"
            ) from exc
        except json.JSONDecodeError as exc:
            raise SmppConfigError(
                f"DISPATCHER_SMPP_FILE: not JSON ({exc.msg}, line {exc.lineno})"
            ) from exc
        return parse(raw, env=env)
    if not inline:
        raise SmppConfigError(
            "DISPATCHER_SMPP or DISPATCHER_SMPP_FILE: required when the provider is smpp"
        )
    return parse(inline, env=env)
