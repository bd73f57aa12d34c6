"""Decide whether a URL may be fetched by a tool (SSRF guard). No traffic is sent here.

Design note
- Only ``http``/``https``. The host is resolved once (``resolve`` is injectable, default
  ``socket.getaddrinfo``) and *every* resolved address must be acceptable: a name that
  resolves to one public and one private address is refused, since either could be used.
- An address is acceptable when it is globally routable: not loopback, private,
  link-local, multicast, reserved, unspecified, shared (100.64/10), nor a cloud metadata
  endpoint. Addresses embedded in IPv6 forms (``::ffff:127.0.0.1``, 6to4, Teredo, NAT64)
  are unwrapped and checked as well.
- Hosts written as numbers that libc accepts but ``ipaddress`` does not (``2130706433``,
  ``0x7f.1``, ``0177.0.0.1``) are decoded here, never handed to a resolver whose parsing
  we would have to trust.
- The allow-list (operator configuration) holds hostnames, IPs or CIDRs. A matching
  hostname unlocks all its addresses; an IP/CIDR unlocks the addresses it contains.
  Cloud metadata endpoints are unlocked only by an *exact* entry (their IP or hostname),
  never by a CIDR: allowing ``169.254.0.0/16`` must not hand out cloud credentials.
- The caller must connect to ``ResolvedTarget.address`` (the checked address), not
  re-resolve the name: a second lookup could answer differently (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from loom_core.errors import LoomError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Iterable[Any]]

ALLOWED_SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class UrlRefused(LoomError):
    """Base of every refusal; ``code`` is the ErrorInfo code a tool should report."""

    code = "address_not_allowed"
    retryable = False

    def __init__(self, url: str, address: str | None, reason: str) -> None:
        self.url = url
        self.address = address
        self.reason = reason
        where = f" ({address})" if address else ""
        super().__init__(f"{redact_url(url)}{where}: {reason}")


class AddressNotAllowed(UrlRefused):
    """The URL's host is (or resolves to) an address tools may not reach."""


class InvalidUrl(AddressNotAllowed):
    """Not an absolute http(s) URL with a host."""

    code = "invalid_url"


class HostNotFound(AddressNotAllowed):
    """The resolver gave no address (often transient)."""

    code = "host_not_found"
    retryable = True


@dataclass(frozen=True)
class ResolvedTarget:
    """A URL that passed the guard. Connect to ``address``; send ``host`` as Host/SNI."""

    url: str
    scheme: str
    host: str  # as written in the URL, lower-cased, no brackets
    port: int
    address: str  # the checked address to connect to (first resolved)
    addresses: tuple[str, ...]  # every resolved address (all were checked)
    allowed_by: str | None = None  # the allow-list entry that unlocked a non-public host


def redact_url(url: str) -> str:
    """``scheme://host:port/path`` — drops userinfo, query and fragment (may hold secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Decode the inet_aton forms: 1-4 dot-separated parts, each decimal, ``0x`` hex or
    ``0``-prefixed octal; the last part fills the remaining bytes. None if not numeric."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                value = int(part[2:] or "0", 16)
            elif len(part) > 1 and part.startswith("0"):
                value = int(part[1:], 8)
            else:
                value = int(part, 10) if part.isdigit() else -1
        except ValueError:
            return None
        if value < 0:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself (no DNS), or None for a hostname."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if "%" in host:  # IPv6 zone id, e.g. fe80::1%eth0
        try:
            return ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
    return parse_loose_ipv4(host)


def embedded_addresses(ip: IPAddress) -> list[IPAddress]:
    """Any IPv4 addresses ``ip`` carries (mapped, 6to4, Teredo, NAT64), then ``ip``."""
    found: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if ip in _NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    found.append(ip)
    return found


def refusal_reason(ip: IPAddress) -> str | None:
    """Why tools may not reach ``ip`` (None when it is a public unicast address).
    Embedded addresses are checked first so the reason names the real target."""
    for candidate in embedded_addresses(ip):
        reason = _reason_single(candidate)
        if reason is not None:
            if candidate is not ip:
                reason = f"{reason} (embedded {candidate})"
            return reason
    return None


def _reason_single(ip: IPAddress) -> str | None:
    if ip in METADATA_ADDRESSES:
        return "cloud metadata endpoint"
    checks = (
        (ip.is_loopback, "loopback address"),
        (ip.is_unspecified, "unspecified address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED, "shared (CGNAT) address"),
        (not ip.is_global, "address is not globally routable"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class AllowList:
    """Parsed ``http_allow_private`` entries."""

    hosts: frozenset[str]
    addresses: frozenset[IPAddress]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Sequence[str]) -> AllowList:
        hosts: set[str] = set()
        addresses: set[IPAddress] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as exc:
                    raise ValueError(
                        f"http_allow_private entry {raw!r} is not a valid CIDR: {exc}"
                    ) from None
                continue
            try:
                addresses.add(ipaddress.ip_address(entry.strip("[]")))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), frozenset(addresses), tuple(networks))

    def host_entry(self, host: str) -> str | None:
        name = host.lower().rstrip(".")
        return name if name in self.hosts else None

    def address_entry(self, ip: IPAddress) -> str | None:
        if ip in self.addresses:
            return str(ip)
        if ip in METADATA_ADDRESSES:  # exact entries only, see module note
            return None
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return str(net)
        return None


def check_url(
    url: str, allow: Sequence[str] = (), resolve: Resolver = socket.getaddrinfo
) -> ResolvedTarget:
    """Return where ``url`` may be fetched, or raise :class:`AddressNotAllowed`
    (subclasses: :class:`InvalidUrl`, :class:`HostNotFound`).

    ``resolve(host, port, type=socket.SOCK_STREAM)`` must behave like
    ``socket.getaddrinfo`` (only ``sockaddr[0]`` of each entry is used)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUrl(url, None, f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidUrl(
            url, None, f"scheme {scheme or '(none)'!r} is not allowed; use http:// or https://"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidUrl(url, None, "the URL has no host; write it like https://example.com/")
    if port is None:
        port = 443 if scheme == "https" else 80
    allow_list = AllowList.parse(allow)

    name = host.rstrip(".")
    by_host = allow_list.host_entry(name)
    if name in METADATA_HOSTS and by_host is None:
        raise AddressNotAllowed(url, None, f"{name} is a cloud metadata endpoint")

    literal = literal_address(host)
    ips = [literal] if literal is not None else _resolve(url, host, port, resolve)

    allowed_by: str | None = None
    for ip in ips:
        reason = refusal_reason(ip)
        if reason is None:
            continue
        entry = allow_list.address_entry(ip)
        # A trusted name unlocks its addresses, except metadata ones (exact entries only).
        if (
            entry is None
            and by_host is not None
            and (ip not in METADATA_ADDRESSES or name in METADATA_HOSTS)
        ):
            entry = by_host
        if entry is None:
            raise AddressNotAllowed(
                url,
                str(ip),
                f"{reason}; to allow it, add the host, address or a CIDR to http_allow_private",
            )
        allowed_by = allowed_by or entry
    addresses = tuple(str(ip) for ip in ips)
    return ResolvedTarget(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        address=addresses[0],
        addresses=addresses,
        allowed_by=allowed_by,
    )


def _resolve(url: str, host: str, port: int, resolve: Resolver) -> list[IPAddress]:
    try:
        infos = list(resolve(host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError) as exc:
        raise HostNotFound(url, None, f"cannot resolve {host!r}: {exc}") from None
    ips: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            # A resolver answering something that is not an address is refused, not trusted.
            raise AddressNotAllowed(url, raw, "resolver returned a non-address") from None
        if ip not in ips:
            ips.append(ip)
    if not ips:
        raise HostNotFound(url, None, f"{host!r} resolved to no address")
    return ips
