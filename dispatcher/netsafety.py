"""SSRF guard for user-supplied callback URLs.

``check_url`` refuses URLs whose host is, or resolves to, an address that is not
publicly routable (loopback, RFC 1918 / ULA private, link-local including the
169.254.169.254 cloud metadata endpoint, multicast, reserved, unspecified,
CGNAT, and IPv6 forms embedding any of those), unless an operator allow-list
covers it. A ``localhost`` name is loopback without asking DNS (RFC 6761).

DNS rebinding: a name checked here must not be resolved again when connecting,
or a hostile DNS server can answer a public address for the check and an
internal one for the connection. ``resolve_checked`` therefore returns the
addresses it validated, and the HTTP client must connect to exactly those
(``dispatcher.webhooks.deliver`` pins its connections to them).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

__all__ = [
    "CheckedURL",
    "ResolveTimeout",
    "UnsafeURL",
    "bounded",
    "check_url",
    "default_resolve",
    "parse_allowlist",
    "resolve_checked",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_PRIVATE: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv6Network("fc00::/7"),
)
# inet_aton accepts shorthand like "127.1", "2130706433" or "0x7f.0.0.1"; the OS
# resolver (and so the HTTP client) treats them as IPv4 literals, so must we.
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_FORBIDDEN_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
# RFC 6761 6.3: localhost names are loopback, whatever a DNS server would answer.
_LOCALHOST: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


class UnsafeURL(ValueError):
    """A callback URL was refused by the SSRF guard."""


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the SSRF guard, with the addresses a connection may use."""

    scheme: str
    host: str  # as in the URL, lower-cased, IPv6 without brackets
    port: int
    # The validated IPs, in resolver order. Connect to these and never resolve
    # ``host`` again. Empty only when ``host`` is an allow-listed hostname: the
    # operator trusts whatever that name resolves to, so nothing is pinned.
    addresses: tuple[str, ...]


def default_resolve(host: str) -> list[str]:
    """Resolve ``host`` to its IP address strings with the system resolver."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ResolveTimeout(OSError):
    """A DNS lookup did not finish within its bound."""


def bounded(resolve: Callable[[str], list[str]], seconds: float) -> Callable[[str], list[str]]:
    """``resolve`` limited to ``seconds`` per lookup (ResolveTimeout when it takes longer)."""
    if not seconds > 0:
        raise ValueError("the resolve timeout must be > 0")

    def lookup(host: str) -> list[str]:
        # getaddrinfo has no timeout of its own and cannot be interrupted, so it runs
        # on a daemon thread we stop waiting for; the caller is free after ``seconds``.
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["addresses"] = resolve(host)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=run, name="resolve", daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            raise ResolveTimeout(f"no answer within {seconds:g} s")
        if "error" in box:
            raise box["error"]
        return list(box["addresses"])

    return lookup


def _ip_literal(host: str) -> IPAddress | None:
    """Return ``host`` as an IP address if it is an IP literal (incl. legacy IPv4 forms)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            return None
    return None


def _normalise_hostname(host: str) -> str:
    """Return ``host`` lower-cased without a trailing root dot."""
    return host.lower().rstrip(".")


def _parse_entry(entry: str) -> IPNetwork | str:
    """Parse one allow-list entry into a network, or a normalised hostname."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return _normalise_hostname(entry)


def parse_allowlist(text: str) -> tuple[str, ...]:
    """Parse a comma-separated allow-list of IPs, CIDRs and hostnames (ValueError on garbage)."""
    entries: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            entries.append(str(ipaddress.ip_network(item, strict=False)))
            continue
        except ValueError:
            pass
        host = _normalise_hostname(item)
        # Digits-and-dots that failed to parse as an IP/CIDR are typos, not hostnames.
        if "/" in item or _LEGACY_IPV4.match(host) or not _HOSTNAME.match(host):
            raise ValueError(f"invalid allow-list entry {item!r}: expected an IP, CIDR or hostname")
        entries.append(host)
    return tuple(dict.fromkeys(entries))


def _basic_reason(addr: IPAddress) -> str | None:
    """Return why ``addr`` itself is not publicly routable, or None if it is."""
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "carrier-grade NAT (100.64.0.0/10)"
    if any(addr in net for net in _PRIVATE):
        return "private"
    if isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local:
        return "site-local"
    if addr.is_reserved:
        return "reserved"
    # Catches the remaining special-purpose ranges (documentation, benchmarking, 0/8 ...).
    if not addr.is_global:
        return "not globally routable"
    return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """Return (kind, IPv4) for IPv6 forms that route to an embedded IPv4 address."""
    if addr.ipv4_mapped is not None:
        return "IPv4-mapped", addr.ipv4_mapped
    if addr.sixtofour is not None:
        return "6to4", addr.sixtofour
    if addr in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _refusal_reason(addr: IPAddress) -> str | None:
    """Return why connecting to ``addr`` is refused, or None if it is allowed."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            kind, v4 = embedded
            reason = _basic_reason(v4)
            return None if reason is None else f"{kind} {reason}"
    return _basic_reason(addr)


def _allowed(addr: IPAddress, networks: Collection[IPNetwork]) -> bool:
    """Return True if ``addr`` (or the IPv4 address it maps to) is inside an allowed network."""
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        candidates.append(addr.ipv4_mapped)
    return any(c in net for c in candidates for net in networks)


def check_url(
    url: str,
    *,
    allow: Collection[str] = (),
    resolve: Callable[[str], list[str]] = default_resolve,
) -> None:
    """Raise UnsafeURL unless ``url`` is http(s) and every host address is safe or allowed.

    Only a validation: to connect, use :func:`resolve_checked` and its addresses.
    """
    resolve_checked(url, allow=allow, resolve=resolve)


def resolve_checked(
    url: str,
    *,
    allow: Collection[str] = (),
    resolve: Callable[[str], list[str]] = default_resolve,
) -> CheckedURL:
    """Check ``url`` like :func:`check_url` and return the addresses that were validated."""
    if _FORBIDDEN_URL_CHARS.search(url):
        raise UnsafeURL("URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        _ = parts.port  # the property raises ValueError for a malformed port
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL: {exc}") from exc
    if parts.scheme not in _ALLOWED_SCHEMES:
        raise UnsafeURL(f"URL scheme must be http or https, not {parts.scheme or 'missing'!r}")
    if "@" in parts.netloc:
        raise UnsafeURL("URL must not contain credentials (userinfo)")
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host")

    networks: list[IPNetwork] = []
    hostnames: set[str] = set()
    for entry in allow:
        parsed = _parse_entry(entry.strip())
        if isinstance(parsed, str):
            hostnames.add(parsed)
        else:
            networks.append(parsed)
    port = _DEFAULT_PORTS[parts.scheme] if parts.port is None else parts.port
    if _normalise_hostname(host) in hostnames:
        return CheckedURL(parts.scheme, host, port, ())

    literal = _ip_literal(host)
    name = _normalise_hostname(host)
    if literal is not None:
        addresses = [literal]
    elif name == "localhost" or name.endswith(".localhost"):
        # Never asked: nor refused only when a resolver happens to answer in time.
        addresses = list(_LOCALHOST)
    else:
        try:
            resolved = resolve(host)
        except (OSError, UnicodeError) as exc:
            raise UnsafeURL(f"cannot resolve host {host!r}: {exc}") from exc
        if not resolved:
            raise UnsafeURL(f"cannot resolve host {host!r}: no addresses")
        try:
            addresses = [ipaddress.ip_address(a) for a in resolved]
        except ValueError as exc:
            raise UnsafeURL(f"cannot resolve host {host!r}: {exc}") from exc

    for addr in addresses:
        reason = _refusal_reason(addr)
        if reason is not None and not _allowed(addr, networks):
            # A name's resolved address is not shown: the message reaches clients,
            # who must not learn what internal names resolve to.
            target = str(addr) if literal is not None else f"host {host!r}"
            raise UnsafeURL(
                f"refusing to connect to {target}: the address is {reason}; "
                "add it to the callback allow-list if this is intended"
            )
    return CheckedURL(parts.scheme, host, port, tuple(dict.fromkeys(str(a) for a in addresses)))
