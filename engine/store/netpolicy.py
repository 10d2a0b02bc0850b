"""Where a pull may connect: public addresses, and private ones only when listed.

A server that fetches URLs for its clients can be made to reach what only it
can reach: its own loopback services, the LAN, a cloud metadata endpoint
(server-side request forgery). :class:`AddressPolicy` decides per resolved
address; :class:`GuardedBackend` applies it at the moment of connecting, so
every hop of a redirect chain is checked, and the address checked is the
address connected to (a name that resolves differently the second time —
DNS rebinding — gains nothing). TLS still verifies the certificate against
the URL's host name, since only the TCP connection is redirected to the
checked address.

Allow-list entries: a host name (``models.internal``), a host and port
(``127.0.0.1:8080``, ``[::1]:9000``), an address or a network in CIDR form
(``10.1.2.3``, ``10.0.0.0/8``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence

import httpcore
import httpx

__all__ = [
    "AddressPolicy",
    "DestinationRefused",
    "GuardedBackend",
    "GuardedTransport",
    "SchemeRefused",
    "guarded_transport",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationRefused(Exception):
    """A pull tried to connect where the policy does not allow."""


class SchemeRefused(DestinationRefused):
    """A redirect led to a scheme the policy does not allow (``https`` to ``http``)."""


def _split(entry: str) -> tuple[str, int | None]:
    text = entry.strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port.isdigit() else None


class AddressPolicy:
    """Public (globally routable, unicast) addresses, plus what ``allow`` lists."""

    def __init__(self, allow: Iterable[str] = (), *, schemes: Iterable[str] | None = None) -> None:
        """``schemes``: the URL schemes every hop may use (None: any httpx speaks)."""
        self.schemes = None if schemes is None else frozenset(x.lower() for x in schemes)
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        self.names: list[tuple[str, int | None]] = []
        for entry in allow:
            host, port = _split(entry)
            try:
                self.networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                self.names.append((host.rstrip("."), port))

    @staticmethod
    def is_public(address: IPAddress) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return address.is_global and not address.is_multicast

    def allows(self, host: str, port: int, address: str) -> bool:
        """Whether a connection to ``address`` (resolved from ``host``) on ``port`` may be made."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if self.is_public(ip):
            return True
        name = host.strip("[]").lower().rstrip(".")
        for allowed, want in self.names:
            if allowed == name and want in (None, port):
                return True
        return any(ip in net and want in (None, port) for net, want in self.networks)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        addresses: Sequence[str] = list(dict.fromkeys(str(i[4][0]) for i in infos))
        allowed = [a for a in addresses if self._policy.allows(host, port, a)]
        if not allowed:
            raise DestinationRefused(host)
        return await self._inner.connect_tcp(
            allowed[0],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport that checks each request's scheme and connects through
    :class:`GuardedBackend`: every redirect hop is a request through it."""

    def __init__(self, policy: AddressPolicy, schemes: Iterable[str] | None = None) -> None:
        """``schemes``: what every request may use, within the policy's own schemes."""
        super().__init__(trust_env=False)
        self._policy = policy
        allowed = None if schemes is None else frozenset(schemes)
        if policy.schemes is not None:
            allowed = policy.schemes if allowed is None else allowed & policy.schemes
        self._schemes = allowed
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=10,
            max_keepalive_connections=5,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        schemes = self._schemes
        if schemes is not None and request.url.scheme not in schemes:
            raise SchemeRefused(request.url.scheme)
        return await super().handle_async_request(request)


def guarded_transport(
    policy: AddressPolicy, schemes: Iterable[str] | None = None
) -> httpx.AsyncHTTPTransport:
    """An httpx transport keeping to ``policy`` (:class:`GuardedTransport`).

    httpx does not take a network backend, so its connection pool is
    replaced by one with the same settings and the guarded backend (proxies
    from the environment are not used: the check must see the real peer).
    """
    return GuardedTransport(policy, schemes)
