"""Triton's system shared memory extension: tensors that a client on this host leaves in memory.

A client beside the server (a sidecar in the pod, a process on the machine) puts its inputs in a
POSIX shared memory object (``shm_open``, /dev/shm), registers a region of it under a name, and
names the region in its requests instead of sending the bytes; it may have outputs written to a
region too (``tritonclient.utils.shared_memory``, ``perf_analyzer --shared-memory system``).

The server reads and writes a region with pread and pwrite on a descriptor opened when it was
registered, never through a mapping: a client that shrinks its object afterwards gets an error,
where reading a mapping past the object's end would kill the server (SIGBUS).

Off unless the server is started with ``--allow-client-shm`` (as Triton since 2.69): a region
lets a client have the server read and write a shared memory object it names. Even then only a
client connected over loopback may register or name one: another host's client has no memory
here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from resserve.serve.errors import Forbidden, InvalidInput, RegionExists, RegionNotFound, Unsupported

SHM_DIR = Path("/dev/shm")  # where Linux keeps shm_open's objects
KEY = re.compile(r"/[^/\x00]{1,254}")  # what shm_open takes: a slash, then a name without one
MAX_REGIONS = 256  # each holds a file descriptor, kept from those for connections (serve/connections.py)
MAX_NAME_CHARS = 256
OFF_MESSAGE = ("client shared memory is off: start the server with --allow-client-shm (RESSERVE_ALLOW_CLIENT_SHM"
               "=true) to let clients on its host pass tensors in system shared memory")


@dataclass(frozen=True)
class Region:
    """A registered region: ``byte_size`` bytes from ``offset`` of the shared memory object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class Placement:
    """Where a tensor lies in shared memory: ``byte_size`` bytes from ``offset`` of region ``region``."""

    region: str
    byte_size: int
    offset: int = 0


def placement(parameters: dict[str, object], where: str) -> Placement | None:
    """A tensor's shared memory parameters (Triton's names), checked; None when it has none."""
    region = parameters.get("shared_memory_region")
    byte_size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if region is None and byte_size is None:
        return None
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{where}: shared_memory_region must name a registered region")
    for name, value in (("shared_memory_byte_size", byte_size), ("shared_memory_offset", offset)):
        if value is None:
            raise InvalidInput(f"{where}: {name} is missing; shared memory needs the region and its byte size")
        if type(value) is not int or value < 0:
            raise InvalidInput(f"{where}: {name} must be an integer >= 0, got {value!r}"[:200])
    return Placement(region, byte_size, offset)


def is_loopback(host: str | None) -> bool:
    """Whether a client connected from ``host`` (an IP address) is on this host."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket sees IPv4
    return (mapped or address).is_loopback


class SharedMemory:
    """The regions registered with this server process, by name (one namespace, as Triton's)."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self._regions: dict[str, tuple[Region, int]] = {}  # name -> the region, the object's descriptor

    def register(self, region: Region) -> None:
        """Open ``region``'s object and check the region lies within it."""
        self.check_allowed()
        if region.name in self._regions:
            raise RegionExists(f"shared memory region {region.name[:128]!r} is registered already; unregister it "
                               "first")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidInput(f"{MAX_REGIONS} shared memory regions are registered, the most a server holds; "
                               "unregister some first")
        if not 0 < len(region.name) <= MAX_NAME_CHARS:
            raise InvalidInput(f"a shared memory region needs a name of 1 to {MAX_NAME_CHARS} characters")
        if region.offset < 0 or region.byte_size < 0:
            raise InvalidInput("a shared memory region's offset and byte_size must be >= 0")
        descriptor = _open(region.key)
        try:
            size = os.fstat(descriptor).st_size
            if region.offset + region.byte_size > size:
                raise InvalidInput(f"shared memory region {region.name[:128]!r}: {region.byte_size} bytes from "
                                   f"offset {region.offset} run past the {size} bytes of {region.key!r}")
        except BaseException:
            os.close(descriptor)
            raise
        self._regions[region.name] = (region, descriptor)

    def unregister(self, name: str) -> None:
        """The region called ``name`` ("": every region) is no longer used; an unknown name is no error."""
        self.check_allowed()
        for region in [name] if name else list(self._regions):
            if (entry := self._regions.pop(region, None)) is not None:
                os.close(entry[1])

    def status(self, name: str) -> list[Region]:
        """The region called ``name``, or every region ("")."""
        return [self._region(name)[0]] if name else [region for region, _ in self._regions.values()]

    def check(self, place: Placement) -> None:
        """That ``place`` lies within a registered region (before any work is done for it)."""
        self._within(place)

    def read(self, place: Placement) -> bytes:
        region, descriptor = self._within(place)
        data = os.pread(descriptor, place.byte_size, region.offset + place.offset)
        if len(data) != place.byte_size:
            raise InvalidInput(f"shared memory region {place.region[:128]!r}: its object {region.key!r} has "
                               "shrunk since it was registered")
        return data

    def write(self, place: Placement, data: bytes) -> None:
        region, descriptor = self._within(place)
        if len(data) > place.byte_size:
            raise InvalidInput(f"shared memory region {place.region[:128]!r}: the output needs {len(data)} bytes, "
                               f"shared_memory_byte_size gives {place.byte_size}")
        if region.offset + place.offset + len(data) > os.fstat(descriptor).st_size:
            raise InvalidInput(f"shared memory region {place.region[:128]!r}: its object {region.key!r} has "
                               "shrunk since it was registered")
        os.pwrite(descriptor, data, region.offset + place.offset)

    def _within(self, place: Placement) -> tuple[Region, int]:
        region, descriptor = self._region(place.region)
        if place.offset + place.byte_size > region.byte_size:
            raise InvalidInput(f"shared memory region {place.region[:128]!r} holds {region.byte_size} bytes; "
                               f"{place.byte_size} from offset {place.offset} run past its end")
        return region, descriptor

    def _region(self, name: str) -> tuple[Region, int]:
        self.check_allowed()
        entry = self._regions.get(name)
        if entry is None:
            raise RegionNotFound(f"no shared memory region {name[:128]!r} is registered")
        return entry

    def check_allowed(self) -> None:
        if not self.allowed:
            raise Unsupported(OFF_MESSAGE)


def no_cuda_region(name: str) -> list[Region]:
    """CUDA shared memory is not served, so no CUDA region is ever registered: its status lists
    none and unregistering succeeds with nothing to do (perf_analyzer unregisters both kinds when
    it ends), where registering one is refused as unsupported."""
    if name:
        raise RegionNotFound(f"no CUDA shared memory region {name[:128]!r} is registered: resserve serves system "
                             "shared memory only")
    return []


def check_client(host: str | None) -> None:
    """Only a client on this host may register or name shared memory: refused in one line otherwise
    (another host's client has no memory here, and would reach the regions of the host's clients)."""
    if not is_loopback(host):
        raise Forbidden(f"only a client on the server's host, connected over loopback, may use system shared "
                        f"memory; this one connected from {(host or 'an unknown address')[:64]}")


def _open(key: str) -> int:
    """A descriptor of the shared memory object ``key``: a regular file of /dev/shm, never a link."""
    if not KEY.fullmatch(key) or key in ("/.", "/.."):
        raise InvalidInput(f"shared memory key {key[:128]!r} is not one: a key is a slash and a name without "
                           "another, as shm_open takes it (\"/input0\")")
    try:
        descriptor = os.open(SHM_DIR / key[1:], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidInput(f"no shared memory object {key!r} on the server's host; create it before registering "
                           "it") from None
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise InvalidInput(f"cannot open shared memory object {key!r}: {reason}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise InvalidInput(f"{key!r} is not a shared memory object")
    return descriptor
