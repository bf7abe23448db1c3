"""Tests for the callback-URL SSRF guard (no real DNS: resolvers are injected)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest

from dispatcher.netsafety import (
    CheckedURL,
    UnsafeURL,
    bounded,
    check_url,
    default_resolve,
    parse_allowlist,
    resolve_checked,
)


def no_dns(host: str) -> list[str]:
    """Resolver that fails the test if called: IP literals must not be resolved."""
    raise AssertionError(f"unexpected DNS lookup for {host!r}")


def fake_dns(table: dict[str, list[str]]) -> Callable[[str], list[str]]:
    """Return a resolver answering from ``table`` and failing like getaddrinfo otherwise."""

    def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return table[host]

    return resolve


REFUSED = {
    "loopback": ["127.0.0.1", "127.9.9.9", "[::1]"],
    "private": [
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "[fd00::1]",
        "[fc00::1]",
    ],
    "link-local": ["169.254.169.254", "169.254.0.1", "[fe80::1]", "[fe80::1%25eth0]"],
    "multicast": ["224.0.0.1", "239.255.255.250", "[ff02::1]"],
    "reserved": ["240.0.0.1", "255.255.255.255"],
    "unspecified": ["0.0.0.0", "[::]"],
    "carrier-grade NAT": ["100.64.0.1", "100.127.255.254"],
    "IPv4-mapped loopback": ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]"],
    "IPv4-mapped private": ["[::ffff:10.0.0.1]", "[::ffff:192.168.0.1]"],
    "IPv4-mapped link-local": ["[::ffff:169.254.169.254]"],
    "IPv4-mapped carrier-grade NAT": ["[::ffff:100.64.0.1]"],
    "6to4 loopback": ["[2002:7f00:1::]"],
    "NAT64 link-local": ["[64:ff9b::a9fe:a9fe]"],
    "not globally routable": ["192.0.2.1", "198.18.0.1", "0.1.2.3", "[2001:db8::1]"],
}


@pytest.mark.parametrize(
    ("host", "reason"), [(h, r) for r, hosts in REFUSED.items() for h in hosts]
)
def test_ip_literals_refused(host: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        check_url(f"https://{host}/hook", resolve=no_dns)


@pytest.mark.parametrize(
    "host",
    [
        "93.184.216.34",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.1",
        "172.32.0.1",
        "[2606:4700:4700::1111]",
        "[::ffff:8.8.8.8]",
    ],
)
def test_public_ip_literals_allowed(host: str) -> None:
    check_url(f"http://{host}:8080/hook?x=1", resolve=no_dns)


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "0x7f.0.0.1", "127.0.0.1."]
)
def test_legacy_ipv4_forms_refused_without_dns(host: str) -> None:
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url(f"http://{host}/", resolve=no_dns)


@pytest.mark.parametrize("host", ["localhost", "LocalHost.", "api.localhost", "a.b.localhost."])
def test_localhost_names_refused_without_dns(host: str) -> None:
    # RFC 6761 6.3: localhost names are loopback, whatever a DNS server says (or when
    # none answers in time, as at intake once a request's DNS time is spent).
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url(f"http://{host}:8080/cb", resolve=no_dns)
    check_url(f"http://{host}/cb", allow=(host.lower().rstrip("."),), resolve=no_dns)
    check_url(f"http://{host}/cb", allow=("127.0.0.0/8", "::1"), resolve=no_dns)


def test_dns_name_resolving_public_allowed() -> None:
    check_url(
        "https://hooks.example.com/x",
        resolve=fake_dns({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1::1"]}),
    )


@pytest.mark.parametrize(
    "bad", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:10.0.0.1", "fe80::1%2"]
)
def test_dns_name_refused_if_any_address_unsafe(bad: str) -> None:
    resolve = fake_dns({"rebind.example.com": ["93.184.216.34", bad]})
    with pytest.raises(UnsafeURL, match=re.escape("host 'rebind.example.com'")) as refused:
        check_url("https://rebind.example.com/", resolve=resolve)
    # The message reaches clients: it must not tell what an internal name resolves to.
    assert bad.split("%")[0] not in str(refused.value)


def test_unresolvable_host() -> None:
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_url("https://nowhere.invalid/", resolve=fake_dns({}))
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_url("https://empty.example/", resolve=fake_dns({"empty.example": []}))
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_url("https://junk.example/", resolve=fake_dns({"junk.example": ["not-an-ip"]}))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/",
        "example.com/path",
        "",
    ],
)
def test_bad_schemes_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="scheme"):
        check_url(url, resolve=no_dns)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://user:pw@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://@example.com/", "credentials"),
        ("http://example.com@127.0.0.1/", "credentials"),
        ("http:///path", "no host"),
        ("http://:80/", "no host"),
        ("http://example.com:99999/", "invalid URL"),
        ("http://example.com:abc/", "invalid URL"),
        ("http://[::1/", "invalid URL"),
        ("http://example.com\\@127.0.0.1/", "backslash"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\r\nX-Injected: 1", "control"),
    ],
)
def test_malformed_urls_refused(url: str, match: str) -> None:
    with pytest.raises(UnsafeURL, match=match):
        check_url(url, resolve=no_dns)


def test_unsafe_url_is_value_error() -> None:
    assert issubclass(UnsafeURL, ValueError)


def test_allow_single_ip() -> None:
    check_url("http://127.0.0.1:8000/", allow=["127.0.0.1"], resolve=no_dns)
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.2:8000/", allow=["127.0.0.1"], resolve=no_dns)


def test_allow_cidr() -> None:
    check_url("http://10.20.30.40/", allow=("10.0.0.0/8",), resolve=no_dns)
    check_url("http://[::ffff:10.20.30.40]/", allow=("10.0.0.0/8",), resolve=no_dns)
    with pytest.raises(UnsafeURL, match="private"):
        check_url("http://192.168.0.1/", allow=("10.0.0.0/8",), resolve=no_dns)


def test_allow_ipv6_cidr() -> None:
    check_url("http://[fd12:3456::1]/", allow=("fd12:3456::/32",), resolve=no_dns)
    with pytest.raises(UnsafeURL):
        check_url("http://[fd99::1]/", allow=("fd12:3456::/32",), resolve=no_dns)


def test_allow_covers_resolved_addresses() -> None:
    resolve = fake_dns({"svc.internal": ["10.0.0.5", "10.0.0.6"]})
    check_url("http://svc.internal/", allow=("10.0.0.0/24",), resolve=resolve)
    resolve = fake_dns({"svc.internal": ["10.0.0.5", "192.168.0.6"]})
    with pytest.raises(UnsafeURL, match="private") as refused:
        check_url("http://svc.internal/", allow=("10.0.0.0/24",), resolve=resolve)
    assert "192.168.0.6" not in str(refused.value)


def test_allow_hostname_literal_skips_resolution() -> None:
    check_url("http://Hooks.Internal./cb", allow=("hooks.internal",), resolve=no_dns)
    with pytest.raises(UnsafeURL, match="cannot resolve"):
        check_url("http://other.internal/cb", allow=("hooks.internal",), resolve=fake_dns({}))


# --- resolve_checked: the addresses a connection must be pinned to -------------------


def test_resolve_checked_returns_the_validated_addresses_in_order() -> None:
    resolve = fake_dns(
        {"hooks.example.com": ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]}
    )
    assert resolve_checked("https://Hooks.Example.com/x", resolve=resolve) == CheckedURL(
        "https", "hooks.example.com", 443, ("93.184.216.34", "2606:2800:220:1::1")
    )


def test_resolve_checked_resolves_once() -> None:
    """One lookup per check: the answer that was validated is the one returned."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str) -> list[str]:
        calls.append(host)
        return next(answers)

    checked = resolve_checked("http://rebind.example.com:8080/", resolve=rebinding)
    assert checked.addresses == ("93.184.216.34",)
    assert checked.port == 8080
    assert calls == ["rebind.example.com"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://8.8.8.8/", CheckedURL("http", "8.8.8.8", 80, ("8.8.8.8",))),
        (
            "https://[2606:4700:4700::1111]:8443/",
            CheckedURL("https", "2606:4700:4700::1111", 8443, ("2606:4700:4700::1111",)),
        ),
        ("http://[::ffff:8.8.8.8]/", CheckedURL("http", "::ffff:8.8.8.8", 80, ("::ffff:808:808",))),
    ],
)
def test_resolve_checked_ip_literals(url: str, expected: CheckedURL) -> None:
    assert resolve_checked(url, resolve=no_dns) == expected


def test_resolve_checked_normalises_legacy_ipv4_literals() -> None:
    # "2130706433" would be dialled as 127.0.0.1 by the OS: the pinned address says so.
    checked = resolve_checked("http://2130706433:8000/", allow=["127.0.0.1"], resolve=no_dns)
    assert checked.addresses == ("127.0.0.1",)


def test_resolve_checked_allowlisted_hostname_pins_nothing() -> None:
    checked = resolve_checked(
        "http://Hooks.Internal./cb", allow=("hooks.internal",), resolve=no_dns
    )
    assert checked == CheckedURL("http", "hooks.internal.", 80, ())


def test_resolve_checked_refuses_like_check_url() -> None:
    resolve = fake_dns({"rebind.example.com": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(UnsafeURL, match="private"):
        resolve_checked("https://rebind.example.com/", resolve=resolve)


def test_default_resolve_numeric_host() -> None:
    # A numeric host never touches DNS, so this is safe offline.
    assert default_resolve("127.0.0.1") == ["127.0.0.1"]


def test_parse_allowlist() -> None:
    assert parse_allowlist(
        " 127.0.0.1 , 10.0.0.0/8,,Hooks.Internal., ::1, fd00::/8, 10.0.0.0/8 "
    ) == (
        "127.0.0.1/32",
        "10.0.0.0/8",
        "hooks.internal",
        "::1/128",
        "fd00::/8",
    )
    assert parse_allowlist("") == ()
    assert parse_allowlist(" , ") == ()


def test_parse_allowlist_result_feeds_check_url() -> None:
    allow = parse_allowlist("127.0.0.1,10.0.0.0/8")
    check_url("http://127.0.0.1/", allow=allow, resolve=no_dns)
    check_url("http://10.9.8.7/", allow=allow, resolve=no_dns)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/33",
        "300.1.1.1",
        "127.1",
        "http://example.com",
        "exa mple.com",
        "host/24",
        "*.example.com",
        "-bad.example",
        "a..b",
    ],
)
def test_parse_allowlist_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_allowlist(f"127.0.0.1,{text}")


# --- bounded DNS -----------------------------------------------------------------------


def test_bounded_resolve_gives_up_after_its_timeout() -> None:
    release = threading.Event()

    def hanging(host: str) -> list[str]:
        release.wait(timeout=10)  # a resolver that never answers (bounded for the test)
        return ["93.184.216.34"]

    lookup = bounded(hanging, 0.2)
    started = time.monotonic()
    try:
        with pytest.raises(UnsafeURL, match=r"cannot resolve host 'slow\.example': no answer"):
            resolve_checked("https://slow.example/hook", resolve=lookup)
        took = time.monotonic() - started
    finally:
        release.set()
    assert 0.2 <= took < 1.5


def test_bounded_resolve_passes_answers_and_errors_through() -> None:
    lookup = bounded(fake_dns({"ok.example": ["93.184.216.34"]}), 2.0)
    assert lookup("ok.example") == ["93.184.216.34"]
    with pytest.raises(OSError):
        lookup("missing.example")
    with pytest.raises(ValueError, match="timeout"):
        bounded(no_dns, 0)
