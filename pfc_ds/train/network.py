"""The network interface of every gloo group pfc_ds opens, agreed by all ranks before it connects.

Without ``GLOO_SOCKET_IFNAME``, gloo listens on the address the hostname resolves to. Debian's
``/etc/hosts`` maps the hostname to ``127.0.1.1``, so on two such hosts each rank advertises a
loopback address: ``connectFullMesh`` is refused on one node while the other sits in the connect
until the group's timeout (``train.collective_timeout_s``, 600 s). NCCL picks a non-loopback
interface by itself; gloo does not, and pfc_ds opens gloo groups itself (the default group on CPU,
the side group for host-side agreement next to NCCL).

So, unless the user set ``GLOO_SOCKET_IFNAME``, ``choose_interface`` sets it, before any group
exists (torch reads it each time it builds a gloo group, DeepSpeed's included), to the interface
holding the local address of the route to ``MASTER_ADDR``: the address the kernel would send from
(a UDP ``connect`` + ``getsockname``; no packet leaves). Then, before a gloo group connects, every
rank posts the address gloo will advertise to the rendezvous store and reads everyone's
(``agree``). The same list gives every rank the same decision:

* a loopback address on a job that spans hosts is refused on every node, in one line naming the
  rank, its address and interface, ``MASTER_ADDR`` and ``GLOO_SOCKET_IFNAME``
  (``GlooInterfaceError``, exit 2). "Spans hosts" is read from the ranks' boot ids and network
  namespaces (ranks share a loopback only within one), not from ``MASTER_ADDR`` alone: two
  launchers on one host reach each other on loopback whatever ``MASTER_ADDR`` says, and node 0
  of ``--master_addr $(hostname)`` on Debian would route to its own ``127.0.1.1`` while the other
  nodes route elsewhere. The refusal comes before the connect because gloo's connect does not
  reliably fail otherwise: of each pair the rank with the lower address listens and the other
  connects, so a loopback address breaks the job only in one direction;
* otherwise the group connects under its own short timeout (``train.connect_timeout_s``), raised
  to the collective timeout once connected. Every rank has arrived by then (``agree`` waited
  for the slowest with the collective timeout), so the short timeout measures only the
  connections. A rank that cannot reach another fails the connect on every node within it, and
  ``connect_failure`` names the addresses (``PeerFailure``, exit 75), instead of a peer waiting
  out the collective timeout.

The addresses are read as gloo reads them: ``getifaddrs(3)``, an interface's first IPv4 or IPv6
address (gloo's ``lookupAddrForIface``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from pfc_ds.train.peers import EXIT_CODE, PeerFailure

log = logging.getLogger("pfc_ds.train")

ENV = "GLOO_SOCKET_IFNAME"
CONNECT_TIMEOUT_S = 30.0  # train.connect_timeout_s's default
_picked: dict[str, str] = {}  # the interface choose_interface set -> why


class GlooInterfaceError(RuntimeError):
    """gloo would advertise a loopback address to ranks on other hosts; the same one line on
    every node (``train.py`` prints it once per node and exits 2)."""


@dataclass(frozen=True)
class Endpoint:
    """What one rank's gloo group listens on, as posted to the rendezvous store."""

    rank: int
    node: str  # torchrun's GROUP_RANK (the node rank), or "?"
    host: str  # boot id + network namespace: ranks with the same host share one loopback
    address: str  # the address gloo advertises
    interface: str  # the interface holding it ("" when unknown)
    how: str  # why that interface: the route to MASTER_ADDR, the user's GLOO_SOCKET_IFNAME, ...

    def describe(self) -> str:
        if self.address == "?":
            return f"rank {self.rank} (node {self.node}) interface {self.interface!r} ({self.how})"
        on = f" on {self.interface}" if self.interface else ""
        return f"rank {self.rank} (node {self.node}) {self.address}{on} ({self.how})"


# ---- addresses, as gloo reads them -------------------------------------------------------------


class _Sockaddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("next", ctypes.POINTER(_Ifaddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_Sockaddr)),
    ("netmask", ctypes.POINTER(_Sockaddr)),
    ("ifu", ctypes.c_void_p),
    ("data", ctypes.c_void_p),
]


def interface_addresses() -> list[tuple[str, str]]:
    """``(interface, address)`` for every IPv4/IPv6 address, in ``getifaddrs(3)`` order (gloo's)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    out = []
    try:
        entry = head
        while entry:
            ifa = entry.contents
            if ifa.addr and ifa.addr.contents.family in (socket.AF_INET, socket.AF_INET6):
                family = ifa.addr.contents.family
                raw = ctypes.string_at(ctypes.cast(ifa.addr, ctypes.c_void_p), 24)
                packed = raw[4:8] if family == socket.AF_INET else raw[8:24]
                out.append((ifa.name.decode(), socket.inet_ntop(family, packed)))
            entry = ifa.next
    finally:
        libc.freeifaddrs(head)
    return out


def interface_of(address: str, table: list[tuple[str, str]] | None = None) -> str | None:
    """The interface holding ``address``, or ``None``."""
    want = ipaddress.ip_address(address)
    for name, addr in table if table is not None else interface_addresses():
        if ipaddress.ip_address(addr.split("%")[0]) == want:
            return name
    return None


def gloo_address(interface: str, table: list[tuple[str, str]] | None = None) -> str | None:
    """The address gloo listens on for ``GLOO_SOCKET_IFNAME=interface``: its first one."""
    rows = table if table is not None else interface_addresses()
    return next((addr for name, addr in rows if name == interface), None)


def route_source(host: str, port: int = 9) -> str:
    """This host's address on the route to ``host`` (the kernel's source-address choice; a UDP
    ``connect`` sends nothing). ``OSError`` when ``host`` does not resolve or has no route."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def host_identity() -> str:
    """Which loopback this process sees: the kernel's boot id and its network namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{boot}/{netns}"


# ---- the pick ----------------------------------------------------------------------------------


def choose_interface(*, force_source: str | None = None) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` to the interface that reaches ``MASTER_ADDR``, unless the user
    set it or there is no ``MASTER_ADDR``; the interface set, or ``None``.

    Must run before the first gloo group: torch reads the variable when it builds one.
    ``force_source``: take this as the route's local address (the ``gloo_loopback`` fault).
    """
    master = os.environ.get("MASTER_ADDR")
    if os.environ.get(ENV) or not master:
        return None
    try:
        source = force_source or route_source(master)
        interface = interface_of(source)
    except (OSError, ValueError) as exc:
        log.warning("pfc_ds: no route to MASTER_ADDR=%s (%s); gloo keeps its default", master, exc)
        return None
    if interface is None:
        log.warning("pfc_ds: no interface holds %s (the route to MASTER_ADDR=%s); gloo keeps its "
                    "default", source, master)  # fmt: skip
        return None
    os.environ[ENV] = interface
    why = "forced by the gloo_loopback fault" if force_source else f"the route to {master}"
    _picked.clear()
    _picked[interface] = f"picked by pfc_ds: {why}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log.info("pfc_ds: gloo uses %s (%s, %s); set %s to override", interface, source,
                 why if force_source else f"the route to MASTER_ADDR={master}", ENV)  # fmt: skip
    return interface


def local_endpoint(rank: int) -> Endpoint:
    """What this rank's next gloo group will advertise, and why."""
    node = os.environ.get("GROUP_RANK", "?")
    ifname = os.environ.get(ENV, "")
    if ifname:
        interface = ifname.split(",")[0]
        how = f"{ENV}={ifname} " + _picked.get(ifname, "set by the user")
        try:
            address = gloo_address(interface) or "?"
        except OSError:
            address = "?"
    else:  # gloo's own rule: the hostname's address if it can bind it, else loopback
        interface, how = "", f"{ENV} unset: the address of hostname {socket.gethostname()}"
        try:
            info = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
            address = info[0][4][0]
            interface = interface_of(address) or ""
        except (OSError, ValueError):
            address = "127.0.0.1"
    return Endpoint(rank, node, host_identity(), address, interface, how)


# ---- agreement before a gloo group connects ----------------------------------------------------


def agree(store, group: str, me: Endpoint, world: int, timeout: timedelta) -> list[Endpoint]:
    """Post ``me`` under ``group`` and return every rank's endpoint, by rank.

    Waits up to ``timeout`` (the collective timeout) for the others: ranks reach this point at
    their own pace (imports, data), which is why the connect itself can have a short timeout.
    A rank that never posts is a ``PeerFailure`` naming it.
    """
    prefix = f"pfc_ds/gloo_endpoints/{group}"
    keys = [f"{prefix}/{r}" for r in range(world)]
    store.set(keys[me.rank], json.dumps(asdict(me)))
    try:
        store.wait(keys, timeout)
    except Exception as exc:  # DistStoreError: a rank never came
        missing = [r for r, k in enumerate(keys) if not _has(store, k)]
        raise PeerFailure(
            f"rank {me.rank}: rank(s) {missing} did not reach the setup of the gloo {group} group "
            f"within train.collective_timeout_s={timeout.total_seconds():g}. "
            f"{str(exc).strip().splitlines()[0][:200]}",
            report=_reports(),
        ) from exc
    values = store.multi_get(keys) if hasattr(store, "multi_get") else [store.get(k) for k in keys]
    return [Endpoint(**json.loads(bytes(v))) for v in values]


def _has(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:
        return False


def _reports() -> bool:
    """One line per node: its first local rank prints."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def check(endpoints: list[Endpoint], group: str, me: int) -> None:
    """Refuse what cannot connect, before it tries: an interface without an address (a typo in
    ``GLOO_SOCKET_IFNAME``), or a loopback address on a job that spans hosts. Every rank holds
    the same list, so every node refuses alike."""
    master = os.environ.get("MASTER_ADDR", "?")
    missing = [e for e in endpoints if e.address == "?"]
    if missing:
        shown = "; ".join(e.describe() for e in _one_per_host(missing))
        raise GlooInterfaceError(
            f"rank {me}: the gloo {group} group has no address to listen on: {shown}: no such "
            f"interface, or it has no IPv4/IPv6 address. Set {ENV} on that node to the interface "
            f"that reaches MASTER_ADDR={master} (`ip route get {master}` names it), or unset it "
            "to let pfc_ds pick it"
        )
    hosts = len({e.host for e in endpoints})
    bad = [e for e in endpoints if is_loopback(e.address)]
    if hosts < 2 or not bad:
        return  # one host: loopback reaches every rank
    shown = "; ".join(e.describe() for e in _one_per_host(bad))
    raise GlooInterfaceError(
        f"rank {me}: the gloo {group} group would listen on a loopback address, which the ranks "
        f"on the other hosts cannot reach (the job spans {hosts} hosts): {shown}. Set {ENV} on "
        f"that node to the interface that reaches MASTER_ADDR={master} (`ip route get {master}` "
        f"names it), or unset {ENV} to let pfc_ds pick it"
    )


def _one_per_host(endpoints: list[Endpoint]) -> list[Endpoint]:
    seen: dict[tuple[str, str, str], Endpoint] = {}
    for e in endpoints:
        seen.setdefault((e.host, e.address, e.interface), e)
    return list(seen.values())


def connect_failure(
    endpoints: list[Endpoint], group: str, me: int, connect_s: float, cause: str
) -> PeerFailure:
    """The ``PeerFailure`` for a gloo group that did not connect within ``connect_s``: the
    same text on every node (the addresses everyone posted), then this rank's gloo error."""
    master = os.environ.get("MASTER_ADDR", "?")
    shown = "; ".join(e.describe() for e in _one_per_host(endpoints))
    first = cause.strip().splitlines()[0][:300] if cause.strip() else "?"
    return PeerFailure(
        f"rank {me}: the gloo {group} group did not connect within train.connect_timeout_s="
        f"{connect_s:g}: some rank cannot reach another's address: {shown}. Set {ENV} on each "
        f"node to the interface that reaches the other hosts (MASTER_ADDR={master}), and let TCP "
        f"through between these addresses. gloo on this rank: {first}",
        report=_reports(),
    )


class Connecting:
    """``with Connecting(store, group, rank, world, timeout, connect_s) as c:`` create the gloo
    group with ``timeout=c.connect_timeout``.

    On entry the endpoints are agreed (``agree``) and checked (``check``); a connect that fails
    leaves as ``connect_failure``. gloo's own connect timeout does not bound the side that waits
    for a peer to connect to it (measured with torch 2.13: five times the timeout), so a
    deadline thread ends this process at ``connect_s`` with the same message and exit code, as
    ``peers.Watchdog`` does for a hung step.
    """

    def __init__(
        self,
        store,
        group: str,
        rank: int,
        world: int,
        timeout: timedelta,
        connect_s: float,
    ) -> None:
        self.store, self.group, self.rank, self.world = store, group, rank, world
        self.timeout = timeout
        self.connect_s = min(connect_s, timeout.total_seconds())
        self.connect_timeout = timedelta(seconds=self.connect_s)
        self.endpoints: list[Endpoint] = []
        self._done = threading.Event()

    def __enter__(self) -> Connecting:
        me = local_endpoint(self.rank)
        self.endpoints = agree(self.store, self.group, me, self.world, self.timeout)
        check(self.endpoints, self.group, self.rank)
        threading.Thread(target=self._deadline, name="pfc_ds-gloo-connect", daemon=True).start()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self._done.set()
        if exc is None or not isinstance(exc, RuntimeError) or isinstance(exc, PeerFailure):
            return False
        raise connect_failure(
            self.endpoints, self.group, self.rank, self.connect_s, str(exc)
        ) from exc

    def _deadline(self) -> None:
        if self._done.wait(self.connect_s):
            return
        failure = connect_failure(
            self.endpoints,
            self.group,
            self.rank,
            self.connect_s,
            f"no connection from a peer after {self.connect_s:g} s",
        )
        if failure.report:
            print(f"train.py: error: {failure}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODE)
