"""The SSRF guard, with injected resolvers: no test here sends any traffic."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from loom_services.tools.netguard import (
    AddressNotAllowed,
    HostNotFound,
    InvalidUrl,
    check_url,
    parse_loose_ipv4,
    redact_url,
    refusal_reason,
)


def fake_resolver(table: dict[str, list[str]], calls: list | None = None):
    """A getaddrinfo stand-in answering from ``table``; unknown names fail like DNS."""

    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        if calls is not None:
            calls.append((host, port, type))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for addr in table[host]:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sockaddr = (addr, port, 0, 0) if fam == socket.AF_INET6 else (addr, port)
            out.append((fam, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    return resolve


def no_resolver(host, *args, **kwargs):
    raise AssertionError(f"the guard must not resolve {host!r}")


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1/", "127.0.0.1"),
        ("http://127.8.9.10:8080/x", "127.8.9.10"),
        ("http://[::1]/", "::1"),
        ("http://10.1.2.3/", "10.1.2.3"),
        ("http://192.168.0.10/", "192.168.0.10"),
        ("http://172.16.0.1/", "172.16.0.1"),
        ("http://172.31.255.255/", "172.31.255.255"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://169.254.1.1/", "169.254.1.1"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254"),
        ("http://100.100.100.200/", "100.100.100.200"),
        ("http://100.64.0.1/", "100.64.0.1"),
        ("http://0.0.0.0/", "0.0.0.0"),
        ("http://224.0.0.1/", "224.0.0.1"),
        ("http://240.0.0.1/", "240.0.0.1"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[fc00::1]/", "fc00::1"),
        ("http://[::]/", "::"),
        ("http://[ff02::1]/", "ff02::1"),
        # IPv4 hidden in IPv6 forms
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1"),
        ("http://[::ffff:7f00:1]/", "::ffff:7f00:1"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe"),
        ("http://[2002:7f00:1::]/", "2002:7f00:1::"),
        ("http://[64:ff9b::a00:1]/", "64:ff9b::a00:1"),
        # numeric spellings libc accepts
        ("http://2130706433/", "127.0.0.1"),
        ("http://0x7f000001/", "127.0.0.1"),
        ("http://0x7f.1/", "127.0.0.1"),
        ("http://0177.0.0.1/", "127.0.0.1"),
        ("http://017700000001/", "127.0.0.1"),
        ("http://127.1/", "127.0.0.1"),
        ("http://2852039166/", "169.254.169.254"),
        ("http://0xA9FEA9FE/", "169.254.169.254"),
        ("https://10.0.0.1:8443/", "10.0.0.1"),
    ],
)
def test_refuses_non_public_literals_without_resolving(url: str, address: str) -> None:
    with pytest.raises(AddressNotAllowed) as info:
        check_url(url, allow=(), resolve=no_resolver)
    err = info.value
    assert err.code == "address_not_allowed"
    assert err.address == address
    assert "http_allow_private" in err.reason  # says how to fix


@pytest.mark.parametrize(
    "host", ["metadata.google.internal", "METADATA.GOOGLE.INTERNAL", "metadata.google.internal."]
)
def test_refuses_metadata_hostnames_before_resolving(host: str) -> None:
    with pytest.raises(AddressNotAllowed, match="metadata"):
        check_url(f"http://{host}/computeMetadata/v1/", resolve=no_resolver)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "ws://example.com/",
        "example.com/path",
        "//example.com/",
        "http:///nohost",
        "http://[::1/",
        "",
    ],
)
def test_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(InvalidUrl) as info:
        check_url(url, resolve=no_resolver)
    assert info.value.code == "invalid_url"
    assert isinstance(info.value, AddressNotAllowed)  # callers may catch one type


def test_refuses_a_name_resolving_to_a_private_address() -> None:
    resolve = fake_resolver({"intranet.example": ["10.0.0.5"]})
    with pytest.raises(AddressNotAllowed) as info:
        check_url("https://intranet.example/", resolve=resolve)
    assert info.value.address == "10.0.0.5"
    assert "private" in info.value.reason


def test_refuses_a_name_when_any_resolved_address_is_private() -> None:
    resolve = fake_resolver({"mixed.example": ["93.184.215.14", "127.0.0.1"]})
    with pytest.raises(AddressNotAllowed) as info:
        check_url("http://mixed.example/", resolve=resolve)
    assert info.value.address == "127.0.0.1"


def test_refuses_a_name_resolving_to_a_mapped_loopback() -> None:
    resolve = fake_resolver({"sneaky.example": ["::ffff:127.0.0.1"]})
    with pytest.raises(AddressNotAllowed, match="loopback"):
        check_url("http://sneaky.example/", resolve=resolve)


def test_accepts_a_public_name_and_reports_the_address_to_connect_to() -> None:
    calls: list = []
    resolve = fake_resolver({"example.com": ["93.184.215.14", "2606:2800:21f:cb07::1"]}, calls)
    target = check_url("https://Example.COM/path?q=1", resolve=resolve)
    assert target.scheme == "https"
    assert target.host == "example.com"
    assert target.port == 443
    assert target.address == "93.184.215.14"
    assert target.addresses == ("93.184.215.14", "2606:2800:21f:cb07::1")
    assert target.allowed_by is None
    assert calls == [("example.com", 443, socket.SOCK_STREAM)]


def test_accepts_public_literals_without_resolving() -> None:
    target = check_url("http://8.8.8.8:8080/", resolve=no_resolver)
    assert (target.address, target.port) == ("8.8.8.8", 8080)
    target6 = check_url("http://[2001:4860:4860::8888]/", resolve=no_resolver)
    assert target6.address == "2001:4860:4860::8888"


def test_unresolvable_host_is_a_retryable_host_not_found() -> None:
    with pytest.raises(HostNotFound) as info:
        check_url("http://nowhere.invalid/", resolve=fake_resolver({}))
    assert info.value.code == "host_not_found"
    assert info.value.retryable


def test_resolver_answering_nothing_is_host_not_found() -> None:
    with pytest.raises(HostNotFound):
        check_url("http://empty.example/", resolve=lambda *a, **k: [])


# --------------------------------------------------------------------------- allow-list


def test_allow_list_ip_unlocks_that_address_only() -> None:
    target = check_url("http://127.0.0.1:9000/", allow=["127.0.0.1"], resolve=no_resolver)
    assert target.allowed_by == "127.0.0.1"
    with pytest.raises(AddressNotAllowed):
        check_url("http://127.0.0.2/", allow=["127.0.0.1"], resolve=no_resolver)


def test_allow_list_cidr_unlocks_resolved_addresses_inside_it() -> None:
    resolve = fake_resolver({"svc.internal": ["10.1.2.3"], "db.internal": ["192.168.1.1"]})
    target = check_url("http://svc.internal/", allow=["10.0.0.0/8"], resolve=resolve)
    assert (target.address, target.allowed_by) == ("10.1.2.3", "10.0.0.0/8")
    with pytest.raises(AddressNotAllowed):
        check_url("http://db.internal/", allow=["10.0.0.0/8"], resolve=resolve)


def test_allow_list_hostname_unlocks_its_addresses() -> None:
    table = {"svc.internal": ["10.1.2.3", "fd12::3"], "svc.internal.": ["10.1.2.3"]}
    resolve = fake_resolver(table)
    target = check_url("http://SVC.internal/", allow=["svc.internal"], resolve=resolve)
    assert target.allowed_by == "svc.internal"
    assert target.addresses == ("10.1.2.3", "fd12::3")
    # A fully qualified spelling (trailing dot) matches the same entry.
    assert check_url("http://svc.internal./", allow=["svc.internal."], resolve=resolve)


def test_metadata_addresses_need_an_exact_allow_entry() -> None:
    url = "http://169.254.169.254/"
    with pytest.raises(AddressNotAllowed, match="metadata"):
        check_url(url, allow=["169.254.0.0/16", "0.0.0.0/0"], resolve=no_resolver)
    # A CIDR still unlocks the other link-local addresses...
    assert check_url("http://169.254.1.1/", allow=["169.254.0.0/16"], resolve=no_resolver)
    # ...and an allowed name must not lead to a metadata address.
    resolve = fake_resolver({"svc.internal": ["169.254.169.254"]})
    with pytest.raises(AddressNotAllowed, match="metadata"):
        check_url("http://svc.internal/", allow=["svc.internal"], resolve=resolve)
    # The operator can still allow it explicitly.
    assert check_url(url, allow=["169.254.169.254"], resolve=no_resolver).allowed_by
    assert check_url(
        "http://metadata.google.internal/",
        allow=["metadata.google.internal"],
        resolve=fake_resolver({"metadata.google.internal": ["169.254.169.254"]}),
    )


def test_invalid_cidr_in_allow_list_says_which_entry() -> None:
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        check_url("http://example.com/", allow=["10.0.0.0/33"], resolve=no_resolver)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "host, expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.258", "10.1.1.2"),
        ("1.2.3.4", "1.2.3.4"),
        ("0", "0.0.0.0"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("4294967296", None),
        ("08.1.1.1", None),
        ("1..2", None),
        ("12ab", None),
    ],
)
def test_parse_loose_ipv4(host: str, expected: str | None) -> None:
    result = parse_loose_ipv4(host)
    assert (str(result) if result else None) == expected


def test_public_addresses_have_no_refusal_reason() -> None:
    for addr in ("93.184.215.14", "8.8.8.8", "2606:4700::1111"):
        assert refusal_reason(ipaddress.ip_address(addr)) is None


def test_redact_url_drops_credentials_and_query() -> None:
    redacted = redact_url("https://user:s3cret@example.com:8443/a/b?token=abc#frag")
    assert redacted == "https://example.com:8443/a/b"
    err = AddressNotAllowed("http://u:pw@10.0.0.1/?key=k3y", "10.0.0.1", "private address")
    assert "pw" not in str(err) and "k3y" not in str(err)
