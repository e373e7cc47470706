"""How the client and the worker reach a master: address, token and TLS, resolved like taskctl's
(arguments first, then TASKMASTER_ADDR / TASKMASTER_TOKEN), and the channels built from them."""

from __future__ import annotations

import ipaddress
import os
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import grpc

from .errors import InvalidArgument

# As the master's default --max-message-bytes: a batch of large payloads fits either way.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class TLS:
    """TLS to the master: verify it against `ca_file`; with `cert_file` and `key_file`, mutual TLS."""

    ca_file: str
    cert_file: Optional[str] = None
    key_file: Optional[str] = None


@dataclass(frozen=True)
class Connection:
    """A resolved master address with the credentials to present to it."""

    address: str
    token: str
    tls: Optional[TLS]
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """Call metadata: the bearer token, or nothing for a master run with --insecure."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def options(self, extra: Optional[List[Tuple[str, int]]] = None) -> List[Tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)] + (extra or [])

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        if self.tls is None:
            return None
        cert = _read(self.tls.cert_file) if self.tls.cert_file else None
        key = _read(self.tls.key_file) if self.tls.key_file else None
        if (cert is None) != (key is None):
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  "mutual TLS needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(_read(self.tls.ca_file), key, cert)

    def channel(self, address: str,
                extra: Optional[List[Tuple[str, int]]] = None) -> grpc.Channel:
        """A blocking-API channel to `address`, one of the masters."""
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=self.options(extra))
        return grpc.secure_channel(address, creds, options=self.options(extra))

    def aio_channel(self, address: str,
                    extra: Optional[List[Tuple[str, int]]] = None) -> "grpc.aio.Channel":
        """An asyncio channel to `address`, one of the masters."""
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=self.options(extra))
        return grpc.aio.secure_channel(address, creds, options=self.options(extra))


# Trailing metadata of the master: on every answer of its own (so its UNAVAILABLE differs from
# one that never reached it), and on a standby's, the address of the master that serves.
ANSWERED_BY_MASTER = "tm-answered"
SERVING_MASTER = "tm-serving-master"
# A call no serving master took is tried again, round after round, for this long.
FAILOVER_S = 15.0
# The most partitions the queues may have (common/partition.h, kMaxPartitions): what a master
# says of more is held to it.
MAX_PARTITIONS = 256
# After every master failed in a row, the pause before the next round.
ROUND_PAUSE_S = 0.2


class Masters:
    """The masters a client or worker was given ("a:7070,b:7070"). With the postgres store one
    of them serves and the others stand by, answering UNAVAILABLE with the serving one's address:
    a call goes to the current address, and when it does not serve, to the one named (if it is
    one of these) or the next. Thread-safe."""

    def __init__(self, addresses: str) -> None:
        self.all = [a.strip() for a in addresses.split(",") if a.strip()]
        self._lock = threading.Lock()
        self._current = 0
        self._failures = 0  # in a row, since one served

    def current(self) -> str:
        with self._lock:
            return self.all[self._current]

    def failed(self, address: str, serving_at: str) -> bool:
        """`address` did not serve; `serving_at` is whom it named. True once every address has
        failed since one last served: time to pause before the next round."""
        with self._lock:
            if self.all[self._current] != address:
                return False  # another call moved on already
            self._failures += 1
            if serving_at and serving_at in self.all:
                self._current = self.all.index(serving_at)
            else:
                self._current = (self._current + 1) % len(self.all)
            if self._failures < len(self.all):
                return False
            self._failures = 0
            return True

    def served(self, address: str) -> None:
        with self._lock:
            if self.all[self._current] == address:
                self._failures = 0


def serving_master(error: grpc.RpcError) -> str:
    """The serving master a standby named in `error`'s trailing metadata; "" when none."""
    trailers = getattr(error, "trailing_metadata", lambda: None)() or ()
    return next((v for k, v in trailers if k == SERVING_MASTER), "")


def fail_over(masters: Masters, address: str, error: grpc.RpcError,
              deadline: float) -> Optional[float]:
    """After a call to `address` failed with `error`: the pause before trying it again at the next
    master, or None to give up. Only a call that reached no serving master goes again, given
    several, before `deadline` (time.monotonic())."""
    if len(masters.all) < 2 or not not_applied(error) or time.monotonic() >= deadline:
        return None
    return ROUND_PAUSE_S if masters.failed(address, serving_master(error)) else 0.0


def not_applied(error: grpc.RpcError) -> bool:
    """Whether a failed call surely did nothing: a master answered that it does not serve, or
    none was reached. A call cut off midway may have been applied."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailers = getattr(error, "trailing_metadata", lambda: None)() or ()
    return (any(k == ANSWERED_BY_MASTER for k, _ in trailers) or
            (error.details() or "").startswith("failed to connect"))


def resolve(address: Optional[str], token: Optional[str], token_file: Optional[str],
            tls: Union[TLS, str, None], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
            ) -> Connection:
    """Fills what the caller left out from the environment, as taskctl does, and checks it."""
    address = address or os.environ.get("TASKMASTER_ADDR", "")
    if not Masters(address).all:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                              "no master address: pass address= or set TASKMASTER_ADDR")
    if token is not None and token_file is not None:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                              "give token= or token_file=, not both")
    if token_file is not None:
        token = read_token_file(token_file)
    elif token is None:
        token = os.environ.get("TASKMASTER_TOKEN", "")
    if isinstance(tls, str):
        tls = TLS(ca_file=tls)
    outside = [a for a in Masters(address).all if not is_loopback(a)]
    if token and tls is None and outside:
        warnings.warn(f"the token travels to {outside[0]} in clear (no TLS): anyone on the path "
                      "can read it and act with it", stacklevel=3)
    return Connection(address, token, tls, max_message_bytes)


def read_token_file(path: str) -> str:
    """The first line of `path` that is neither empty nor a # comment, as the daemons read it."""
    text = _read(path).decode("utf-8")
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"{path} can be read by other users: chmod 600 it", stacklevel=4)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"token file {path} holds no token")


def is_loopback(address: str) -> bool:
    """Whether host:port names this machine (localhost, 127.0.0.0/8, ::1, a unix socket)."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                              f"cannot read {path}: {e.strerror}") from None
