"""Pod addresses as files, host-local's way: plain data on disk, no kernel objects.

    <root>/tenants/<n>     the tenant whose subnet is the n-th /tenant_prefix of the pod CIDR
    <root>/addrs/<ip>      the pod id the address is leased to

With an IPv6 pod CIDR as well (dual-stack), a pod's IPv6 address is derived from its IPv4 lease:
the same tenant index and host part within the IPv6 CIDR. One lease holds both, so the two can
never disagree, and nothing about IPv6 is written down.

Every entry is written aside, then hard-linked into place (link(2) fails on an existing name):
no address or subnet is ever handed out twice, and none is ever half-recorded, not even by a
server that died between choosing and recording: the file, whole, is the choice. A lease
whose pod has no record any more (a RunPodSandbox killed midway) is released by the pods'
reconcile, which calls `release`.
"""

from __future__ import annotations

import ipaddress
import os

from stockade.runtime.errors import SpecError, StockadeError


class Exhausted(StockadeError):
    """No subnet or address is left (RESOURCE_EXHAUSTED)."""


def check_cidr(cidr: str, prefix: int, where: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(cidr)
    except ValueError as exc:
        raise SpecError(f"pod_cidr {cidr!r} is not an IPv4 network: {exc}", where=where,
                        hint='e.g. "10.88.0.0/16" (the host bits zero)') from None
    if not net.prefixlen <= prefix <= 29:
        raise SpecError(f"tenant_prefix {prefix} does not fit pod_cidr {cidr}", where=where,
                        hint=f"between {net.prefixlen} and 29")
    return net


def check_cidr6(cidr6: str, net: ipaddress.IPv4Network, where: str) -> ipaddress.IPv6Network | None:
    """The IPv6 pod CIDR ("" : none, IPv4 only); room for every tenant and host part of NET's."""
    if not cidr6:
        return None
    try:
        net6 = ipaddress.IPv6Network(cidr6)
    except ValueError as exc:
        raise SpecError(f"pod_cidr6 {cidr6!r} is not an IPv6 network: {exc}", where=where,
                        hint='e.g. "fd00:88::/64" (the host bits zero)') from None
    if net6.prefixlen > 96 + net.prefixlen:  # tenant bits and host bits as many as IPv4's
        raise SpecError(f"pod_cidr6 {cidr6} is too small for pod_cidr {net}", where=where,
                        hint=f"a prefix of at most /{96 + net.prefixlen}")
    return net6


class Ipam:
    def __init__(self, root: str, pod_cidr: str, tenant_prefix: int, pod_cidr6: str = "") -> None:
        self.net = check_cidr(pod_cidr, tenant_prefix, "pod_network")
        self.net6 = check_cidr6(pod_cidr6, self.net, "pod_network")
        self.prefix = tenant_prefix
        self.tenant_dir = os.path.join(root, "tenants")
        self.addr_dir = os.path.join(root, "addrs")
        for path in (self.tenant_dir, self.addr_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
            for name in os.listdir(path):  # what a server killed inside _claim left aside
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(path, name))

    # -- tenants

    def count(self) -> int:
        return 1 << (self.prefix - self.net.prefixlen)

    def nth(self, index: int) -> ipaddress.IPv4Network:
        base = int(self.net.network_address) + (index << (32 - self.prefix))
        return ipaddress.IPv4Network((base, self.prefix))

    def six(self, ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
        """IP's IPv6 twin: the same tenant index and host part within the IPv6 pod CIDR."""
        assert self.net6 is not None
        offset = int(ip) - int(self.net.network_address)
        index, host = offset >> (32 - self.prefix), offset & ((1 << (32 - self.prefix)) - 1)
        base = int(self.net6.network_address)
        return ipaddress.IPv6Address(base + (index << (128 - self.prefix6())) + host)

    def prefix6(self) -> int:
        assert self.net6 is not None
        return self.net6.prefixlen + self.prefix - self.net.prefixlen

    def subnet6(self, subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network((self.six(subnet.network_address), self.prefix6()))

    def tenants(self) -> dict[str, ipaddress.IPv4Network]:
        out = {}
        for name in os.listdir(self.tenant_dir):
            if name.isdigit() and int(name) < self.count():
                out[_read(os.path.join(self.tenant_dir, name))] = self.nth(int(name))
        return out

    def subnet(self, tenant: str) -> ipaddress.IPv4Network:
        """The tenant's subnet, allocated on first use."""
        known = self.tenants()
        if tenant in known:
            return known[tenant]
        taken = set(os.listdir(self.tenant_dir))
        for index in range(self.count()):
            if str(index) not in taken and _claim(os.path.join(self.tenant_dir, str(index)), tenant):
                return self.nth(index)
        raise Exhausted(f"every /{self.prefix} of {self.net} has a tenant", where="pod_network.pod_cidr",
                        hint="a larger pod_cidr or a longer tenant_prefix")

    def release_tenant(self, tenant: str) -> None:
        """Free the tenant's subnet (its last pod is gone, its leases with it)."""
        for name in os.listdir(self.tenant_dir):
            path = os.path.join(self.tenant_dir, name)
            if name.isdigit() and _read(path) == tenant:
                os.unlink(path)

    # -- addresses

    def lease(self, tenant: str, pod_id: str) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Address]:
        """(the pod's address with its subnet's length, the gateway): the pod's lease if it has
        one, else the lowest free address (the first is the gateway's)."""
        subnet = self.subnet(tenant)
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        gateway = ipaddress.IPv4Address(first)
        leases = self.leases()
        for ip, owner in leases.items():
            if owner == pod_id and ip in subnet:
                return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}"), gateway
        for n in range(first + 1, last + 1):
            ip = ipaddress.IPv4Address(n)
            if ip not in leases and _claim(os.path.join(self.addr_dir, str(ip)), pod_id):
                return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}"), gateway
        raise Exhausted(f"tenant {tenant!r} has no free address in {subnet}",
                        where="pod_network.tenant_prefix", hint="a shorter tenant_prefix")

    def leases(self) -> dict[ipaddress.IPv4Address, str]:
        out = {}
        for name in os.listdir(self.addr_dir):
            try:
                out[ipaddress.IPv4Address(name)] = _read(os.path.join(self.addr_dir, name))
            except (ValueError, FileNotFoundError):
                continue
        return out

    def release(self, pod_id: str) -> list[str]:
        """Free every address leased to POD_ID; returns them."""
        freed = []
        for ip, owner in self.leases().items():
            if owner == pod_id:
                try:
                    os.unlink(os.path.join(self.addr_dir, str(ip)))
                    freed.append(str(ip))
                except FileNotFoundError:
                    pass
        return freed


def _claim(path: str, owner: str) -> bool:
    """Make PATH hold OWNER unless PATH exists; atomic, content included."""
    aside = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, owner.encode())  # no fsync: what needs it (a power cut) takes the pods along
    finally:
        os.close(fd)
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(aside)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
