"""Fetching ``image_url`` and ``mask_url`` inputs without becoming an SSRF proxy.

A URL input is either a ``data:`` URL (decoded here, no network) or an ``http(s)`` URL that
we download under a :class:`FetchPolicy`:

- the host is resolved *before* connecting, and unless ``allow_private`` is set every
  address it resolves to must be public (not private, loopback, link-local, multicast,
  reserved or unspecified; IPv4 embedded in IPv6 is unwrapped first). Checking resolved
  addresses rather than the URL's text catches ``2130706433``, ``0x7f.1``, ``[::1]``,
  ``[::ffff:127.0.0.1]`` and ``localhost`` alike;
- we connect to the very address we checked, so a DNS answer that changes between the
  check and the connection (DNS rebinding) cannot redirect us (see ``_get_once``);
- redirects are followed by hand, each hop checked again, at most ``max_redirects``;
- the body is streamed and abandoned as soon as it passes ``max_bytes``;
- the whole fetch, DNS included, runs under one ``timeout_s`` deadline.

Everything that goes wrong becomes FetchRefused (422) or PayloadTooLarge (413), raised
``from`` the httpx or socket error. Logs carry at most the host and a byte count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from livegen.engine.imaging import parse_data_url
from livegen.protocol.errors import FetchRefused, PayloadTooLarge

__all__ = ["FetchPolicy", "Resolver", "check_target", "fetch_bytes"]

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: how a host name becomes IP address strings."""

Loc = tuple[str | int, ...]
"""Where a URL sits in the request, as a 422 detail's ``loc``: ``("body", "image_url")``."""

_SCHEMES = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3


async def fetch_bytes(
    url: str,
    policy: FetchPolicy,
    *,
    field: str = "image_url",
    resolver: Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The bytes behind ``url`` (a ``data:``, ``http:`` or ``https:`` URL), fetched under ``policy``.

    ``resolver`` and ``transport`` are seams for tests; by default the host is resolved with
    the event loop's ``getaddrinfo`` and fetched with httpx's own transport.
    """
    if url[:5].lower() == "data:":
        return parse_data_url(url, max_bytes=policy.max_bytes, field=field)[1]

    loc = ("body", field)
    target = _checked_url(url, field, data_ok=True)
    try:
        async with asyncio.timeout(policy.timeout_s):
            async with httpx.AsyncClient(
                transport=transport,
                follow_redirects=False,
                # No proxies or .netrc from the environment: we must connect to the address we checked.
                trust_env=False,
                timeout=httpx.Timeout(policy.timeout_s),
            ) as client:
                return await _fetch(client, target, policy, field, resolver or _getaddrinfo)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise FetchRefused(f"{field} download timed out after {policy.timeout_s:g} s", loc=loc) from exc
    except httpx.ConnectError as exc:
        raise FetchRefused(f"{field} could not be fetched: cannot connect to {target.host}", loc=loc) from exc
    except httpx.HTTPError as exc:
        raise FetchRefused(f"{field} could not be fetched from {target.host} ({type(exc).__name__})", loc=loc) from exc


async def _fetch(
    client: httpx.AsyncClient, target: httpx.URL, policy: FetchPolicy, field: str, resolve: Resolver
) -> bytes:
    for _hop in range(policy.max_redirects + 1):
        addresses = await _checked_addresses(target, policy, field, resolve)
        result = await _get_once(client, target, addresses, policy, field)
        if isinstance(result, bytes):
            return result
        target = result
    raise FetchRefused(f"{field} was redirected more than {policy.max_redirects} times", loc=("body", field))


def _checked_url(
    url: str | httpx.URL, field: str, *, redirected: bool = False, loc: Loc | None = None, data_ok: bool = False
) -> httpx.URL:
    """Parse ``url`` as httpx will, and refuse anything but an http(s) URL with a host.
    ``data_ok``: the field also takes data URLs (handled before this), which the refusal says."""
    loc = loc or ("body", field)
    what = f"{field} redirected to" if redirected else f"{field} is"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchRefused(f"{what} an invalid URL", loc=loc) from exc
    if parsed.scheme not in _SCHEMES:
        kind = f"a {parsed.scheme}: URL" if parsed.scheme else "a URL without a scheme"
        accepted = "http(s) and data URLs are" if data_ok else "http(s) URLs are"
        raise FetchRefused(f"{what} {kind}; only {accepted} accepted", loc=loc)
    if not parsed.raw_host:
        raise FetchRefused(f"{what} a URL without a host", loc=loc)
    return parsed


async def _checked_addresses(
    target: httpx.URL, policy: FetchPolicy, field: str, resolve: Resolver, *, loc: Loc | None = None
) -> list[str]:
    """The addresses ``target``'s host resolves to, refusing non-public ones unless allowed."""
    loc = loc or ("body", field)
    host = target.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets
    port = target.port or _SCHEMES[target.scheme]
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:  # a name, or an IP form only the OS parses (2130706433, 0x7f.1): resolve it
        try:
            addresses = list(dict.fromkeys(await resolve(host, port)))
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise FetchRefused(f"{field} host {host} could not be resolved", loc=loc) from exc
    if not addresses:
        raise FetchRefused(f"{field} host {host} could not be resolved", loc=loc)

    checked: list[str] = []
    for address in addresses:
        ip = _parse_ip(address)
        if not policy.allow_private and (ip is None or not _is_public(ip)):
            where = address if address == host else f"{host} → {address}"
            raise FetchRefused(
                f"{field} points to a private or loopback address ({where}); "
                "start the server with --allow-private-urls to allow it",
                loc=loc,
            )
        if ip is None:
            continue  # only reachable with allow_private: an address we cannot even parse
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # connect over IPv4, which is what the mapped form means
        checked.append(str(ip))
    if not checked:
        raise FetchRefused(f"{field} host {host} could not be resolved", loc=loc)
    return checked


def _parse_ip(address: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _is_public(ip: _IPAddress) -> bool:
    """Whether ``ip`` is a global unicast address, looking inside IPv6 forms that carry IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
        if ip.ipv4_mapped is not None:
            return True  # the IPv4 address it stands for is public; the ::ffff:0:0/96 range is not
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


async def _get_once(
    client: httpx.AsyncClient, target: httpx.URL, addresses: list[str], policy: FetchPolicy, field: str
) -> bytes | httpx.URL:
    """GET ``target`` from one of ``addresses``: its body, or the URL it redirects to.

    DNS pinning: the request goes to ``scheme://<checked address>:<port>/path`` with the
    ``Host`` header set to the original host and, for https, ``sni_hostname`` set to it too,
    so httpcore sends the right SNI and verifies the certificate against the host name, not
    the IP. httpx never resolves the name itself, so nothing can change between our check and
    the connection. Addresses are tried in order while the connection itself fails.
    """
    loc = ("body", field)
    host = target.raw_host.decode("ascii")
    headers = {
        "Host": target.netloc.decode("ascii"),
        "Accept": "image/*, */*;q=0.5",
        "Accept-Encoding": "identity",
        "User-Agent": "livegen",
    }
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    last_error: httpx.ConnectError | None = None
    for address in addresses:
        try:
            pinned = target.copy_with(host=address)
        except httpx.InvalidURL as exc:
            raise FetchRefused(f"{field} host {host} resolved to an unusable address", loc=loc) from exc
        try:
            async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                return await _read_response(response, target, policy, field)
        except httpx.ConnectError as exc:  # nothing was sent: the next address may do better
            last_error = exc
        except httpx.InvalidURL as exc:
            # httpx builds ``response.next_request`` for every 3xx even when not following
            # redirects, and some Locations (``data:...``) make that raise before we see them.
            raise FetchRefused(f"{field} redirected to an invalid or unsupported URL", loc=loc) from exc
    assert last_error is not None  # addresses is never empty
    raise last_error


async def _read_response(
    response: httpx.Response, target: httpx.URL, policy: FetchPolicy, field: str
) -> bytes | httpx.URL:
    loc = ("body", field)
    host = target.host
    status = response.status_code
    if status in _REDIRECTS and "location" in response.headers:
        # Resolve relative Locations against the URL as the user wrote it, not the pinned one.
        try:
            next_url = target.join(response.headers["location"])
        except httpx.InvalidURL as exc:
            raise FetchRefused(f"{field} redirected to an invalid URL", loc=loc) from exc
        return _checked_url(next_url, field, redirected=True)
    if not 200 <= status < 300:
        raise FetchRefused(f"{field} could not be fetched: {host} answered HTTP {status}", loc=loc)

    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise _too_large(field, policy.max_bytes)
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > policy.max_bytes:
            raise _too_large(field, policy.max_bytes)
        chunks.append(chunk)
    logger.debug("fetched %d bytes for %s from %s", total, field, host)
    return b"".join(chunks)


def _too_large(field: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field} is larger than the {max_bytes}-byte limit for input files")


async def _getaddrinfo(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_target(
    url: str, *, allow_private: bool, field: str, loc: Loc | None = None, resolver: Resolver | None = None
) -> tuple[httpx.URL, list[str]]:
    """Parse and resolve an http(s) URL we will call (a webhook), refusing private addresses.

    ``loc`` is where the URL came from, for a refusal's 422 detail: ``("body", field)`` unless
    given (``("query", "fal_webhook")`` for the queue's webhook parameter).
    Returns the URL and the checked addresses to connect to (pin one of them, as ``_get_once``
    does, so the check and the connection see the same address).
    """
    target = _checked_url(url, field, loc=loc)
    policy = FetchPolicy(allow_private=allow_private)
    return target, await _checked_addresses(target, policy, field, resolver or _getaddrinfo, loc=loc)
