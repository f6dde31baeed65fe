"""URL input: off unless CLIP_URL_ALLOW_HOSTS names hosts; never reaches private networks."""
import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import requests

from .intake import ClientError

MAX_REDIRECTS = 3


def host_allowed(host, allow_hosts):
    """Exact host names, or '.example.com' for the domain and its subdomains."""
    host = host.lower().rstrip(".")
    for allowed in allow_hosts:
        if allowed.startswith(".") and (host == allowed[1:] or host.endswith(allowed)):
            return True
        if host == allowed:
            return True
    return False


def public_address(ip):
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def check_url(url, allow_hosts, resolve=socket.getaddrinfo):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ClientError(400, "url_refused", "Only http and https URLs are accepted.")
    host = parts.hostname or ""
    if not host or not host_allowed(host, allow_hosts):
        raise ClientError(400, "url_refused", f"The host {host[:100]!r} is not on the allow-list.")
    try:
        addresses = {info[4][0] for info in resolve(host, parts.port or None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError, OSError):
        raise ClientError(400, "url_unreachable", f"The host {host[:100]!r} could not be resolved.") from None
    if not addresses or not all(public_address(a) for a in addresses):
        # loopback, private, link-local (cloud metadata at 169.254.169.254), reserved: never fetched
        raise ClientError(400, "url_refused", f"The host {host[:100]!r} resolves to a non-public address.")


def fetch(url, allow_hosts, timeout_s, max_bytes, resolve=socket.getaddrinfo):
    """Download an image, re-checking every redirect hop, within a size and an overall time limit."""
    if not allow_hosts:
        raise ClientError(400, "url_disabled", "URL input is off on this server (no CLIP_URL_ALLOW_HOSTS).")
    deadline = time.monotonic() + timeout_s
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment may bypass the address checks
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, allow_hosts, resolve)
            try:
                response = session.get(url, stream=True, allow_redirects=False,
                                       timeout=(min(timeout_s, 3.0), timeout_s))
            except requests.RequestException as exc:
                raise ClientError(400, "url_unreachable", f"The URL could not be fetched ({type(exc).__name__}).") \
                    from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status_code != 200:
                    raise ClientError(400, "url_unreachable", f"The URL answered HTTP {response.status_code}.")
                if int(response.headers.get("Content-Length") or 0) > max_bytes:
                    raise ClientError(413, "url_too_large", f"The URL's content is over {max_bytes} bytes.")
                data = bytearray()
                try:
                    for chunk in response.iter_content(65536):
                        data += chunk
                        if len(data) > max_bytes:
                            raise ClientError(413, "url_too_large", f"The URL's content is over {max_bytes} bytes.")
                        if time.monotonic() > deadline:
                            raise ClientError(400, "url_timeout", f"The URL took longer than {timeout_s:g} s.")
                except requests.RequestException as exc:
                    raise ClientError(400, "url_unreachable", f"The download failed ({type(exc).__name__}).") \
                        from None
                return bytes(data)
    raise ClientError(400, "url_refused", f"More than {MAX_REDIRECTS} redirects.")
