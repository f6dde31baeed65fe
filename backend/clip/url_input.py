"""URL input: off unless CLIP_URL_ALLOW_HOSTS names hosts; reaches no private network unless
CLIP_URL_ALLOW_NETWORKS names it (an explicit opt-in, e.g. an in-cluster image host or a local test).

Every hop (the URL, then each redirect) is checked: http(s) only, host on the allow-list, and every
address the host resolves to public or inside a named network. The connection then goes to exactly
those checked addresses: a second DNS lookup (what an HTTP library would do) could be answered
differently (DNS rebinding); and the peer the socket is connected to is checked once more.
One timer bounds the whole download, however slowly a server drips its headers or body.

`resolve` and `address_ok` are the test seams: a fake resolver, and (only in tests, to fetch from a
loopback test server) a wider address check. Production always uses getaddrinfo and public_address.
"""

import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast
from urllib.parse import SplitResult, urljoin, urlsplit

from .errors import ClientError

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that carry an IPv4 one in their low bits
Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape: (host, port, proto=...) -> infos
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, setting: str = "CLIP_URL_ALLOW_NETWORKS") -> tuple[Network, ...]:
    """'10.0.0.0/8, 127.0.0.1' -> networks (a bare address is its /32 or /128); a bad one: a ValueError of one
    line naming the setting, the value and what is allowed.
    Host bits set ('10.1.2.3/8') are refused, not silently widened: the operator meant something else."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(
                f"{setting} must be networks such as 10.0.0.0/8, comma-separated, not {item!r} ({exc})"
            ) from None
    return tuple(networks)


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """The address (or the IPv4 address an IPv4-mapped IPv6 one carries) lies in one of the networks."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if address.version == 6 and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    if address.version == 6 and address.scope_id:  # fe80::1%eth0: the network has no zone
        candidates.append(ipaddress.IPv6Address(str(address).split("%")[0]))
    return any(a.version == n.version and a in n for a in candidates for n in networks)


def address_check(networks: Iterable[Network], address_ok: Callable[[str], bool]) -> Callable[[str], bool]:
    """The check every resolved and every connected address passes: address_ok, or inside a named network."""
    named = tuple(networks)
    if not named:
        return address_ok
    return lambda ip: address_ok(ip) or in_networks(ip, named)


def host_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    """Exact host names, or '.example.com' for the domain and its subdomains."""
    host = host.lower().rstrip(".")
    for allowed in allow_hosts:
        if allowed.startswith(".") and (host == allowed[1:] or host.endswith(allowed)):
            return True
        if host == allowed:
            return True
    return False


def public_address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast only: no loopback, private, link-local (cloud metadata at
    169.254.169.254 and fd00:ec2::254), shared, reserved or multicast address, nor an IPv6 one
    that embeds such an IPv4 address (mapped, 6to4, NAT64)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


def check_url(
    url: str,
    allow_hosts: Iterable[str],
    resolve: Resolver = socket.getaddrinfo,
    address_ok: Callable[[str], bool] = public_address,
) -> tuple[SplitResult, list[str]]:
    """Refuse the URL unless it may be fetched; return (its parts, the checked addresses to connect to)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port  # .port raises ValueError when out of range
    except ValueError:
        raise ClientError(400, "url_refused", "The URL is not valid.") from None
    if parts.scheme not in ("http", "https"):
        raise ClientError(400, "url_refused", "Only http and https URLs are accepted.")
    if not host or not host_allowed(host, allow_hosts):
        raise ClientError(400, "url_refused", f"The host {host[:100]!r} is not on the allow-list.")
    try:
        infos = resolve(host, port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    except (OSError, UnicodeError, ValueError):  # socket.gaierror is an OSError
        raise ClientError(400, "url_unreachable", f"The host {host[:100]!r} could not be resolved.") from None
    if not addresses or not all(address_ok(a) for a in addresses):
        raise ClientError(400, "url_refused", f"The host {host[:100]!r} resolves to a non-public address.")
    return parts, addresses


def fetch(
    url: str,
    allow_hosts: Sequence[str],
    timeout_s: float,
    max_bytes: int,
    resolve: Resolver = socket.getaddrinfo,
    address_ok: Callable[[str], bool] = public_address,
    allow_networks: Iterable[Network] = (),
) -> bytes:
    """Download an image, re-checking every redirect hop, within a size and an overall time limit.
    allow_networks (CLIP_URL_ALLOW_NETWORKS): addresses in them pass as public ones do."""
    if not allow_hosts:
        raise ClientError(400, "url_disabled", "URL input is off on this server (no CLIP_URL_ALLOW_HOSTS).")
    ok = address_check(allow_networks, address_ok)
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts, addresses = check_url(url, allow_hosts, resolve, ok)
        location, data = _get(parts, addresses, ok, deadline, timeout_s, max_bytes)
        if location is None:
            return cast(bytes, data)  # no location: the body
        url = urljoin(url, location)
    raise ClientError(400, "url_refused", f"More than {MAX_REDIRECTS} redirects.")


def _get(
    parts: SplitResult,
    addresses: list[str],
    address_ok: Callable[[str], bool],
    deadline: float,
    timeout_s: float,
    max_bytes: int,
) -> tuple[str | None, bytes | None]:
    """One GET to the checked addresses -> (redirect location, None) or (None, body)."""
    conn = _Connection(parts, addresses, address_ok, timeout=max(0.01, deadline - time.monotonic()))
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), conn.abort)
    timer.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(
            "GET", path, headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "clip-function"}
        )
        response = conn.getresponse()
        if response.status in REDIRECTS and response.getheader("Location"):
            return response.getheader("Location"), None
        if response.status != 200:
            raise ClientError(400, "url_unreachable", f"The URL answered HTTP {response.status}.")
        length = (response.getheader("Content-Length") or "").strip()
        if length.isdigit() and int(length) > max_bytes:
            raise ClientError(413, "url_too_large", f"The URL's content is over {max_bytes:,} bytes.")
        data = bytearray()
        while chunk := response.read1(65536):  # whatever has arrived: a drip cannot stall past the timer
            data += chunk
            if len(data) > max_bytes:
                raise ClientError(413, "url_too_large", f"The URL's content is over {max_bytes:,} bytes.")
        if conn.aborted:  # the timer ended the read: what arrived is not the whole picture
            raise OSError("timed out")
        return None, bytes(data)
    except ClientError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: e.g. a non-ASCII path
        if conn.aborted or isinstance(exc, TimeoutError):
            raise ClientError(400, "url_timeout", f"The URL took longer than {timeout_s:g} s.") from None
        raise ClientError(400, "url_unreachable", f"The URL could not be fetched ({type(exc).__name__}).") from None
    finally:
        timer.cancel()
        conn.close()


class _Connection(http.client.HTTPConnection):
    """HTTP or HTTPS to the checked addresses only, and to a peer that passes address_ok once connected;
    abort() (from the timer's thread) ends any wait."""

    def __init__(self, parts: SplitResult, addresses: list[str], address_ok: Callable[[str], bool], timeout: float):
        https = parts.scheme == "https"
        super().__init__(cast(str, parts.hostname), parts.port or (443 if https else 80), timeout=timeout)
        self.addresses, self.address_ok, self.https, self.aborted = addresses, address_ok, https, False

    def connect(self) -> None:
        error = OSError("no address to connect to")
        for address in self.addresses:
            if self.aborted:
                break
            try:
                self.sock = socket.create_connection((address, self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        if self.aborted:
            raise TimeoutError("timed out")
        peer = self.sock.getpeername()[0]  # what the kernel actually connected to, whatever was asked
        if not self.address_ok(peer):
            raise ClientError(400, "url_refused", f"The connection reached a non-public address ({peer}).")
        if self.https:  # certificate checked against the host name, as any client would
            self.sock = tls_context().wrap_socket(self.sock, server_hostname=self.host)

    def abort(self) -> None:
        self.aborted = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read; close() stays with the owner
            except OSError:
                pass


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    try:
        import certifi  # the CA bundle requests uses: a slim image may have no system CA store

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()
