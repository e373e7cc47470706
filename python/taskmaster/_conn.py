"""How the client and the worker reach a master: address, token and TLS, resolved like taskctl's
(arguments first, then TASKMASTER_ADDR / TASKMASTER_TOKEN), and the channels built from them."""

from __future__ import annotations

import ipaddress
import os
import stat
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

    def channel(self, extra: Optional[List[Tuple[str, int]]] = None) -> grpc.Channel:
        """A blocking-API channel to the master."""
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.address, options=self.options(extra))
        return grpc.secure_channel(self.address, creds, options=self.options(extra))

    def aio_channel(self, extra: Optional[List[Tuple[str, int]]] = None) -> "grpc.aio.Channel":
        """An asyncio channel to the master."""
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.address, options=self.options(extra))
        return grpc.aio.secure_channel(self.address, creds, options=self.options(extra))


def resolve(address: Optional[str], token: Optional[str], token_file: Optional[str],
            tls: Union[TLS, str, None], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
            ) -> Connection:
    """Fills what the caller left out from the environment, as taskctl does, and checks it."""
    address = address or os.environ.get("TASKMASTER_ADDR", "")
    if not address:
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
    if token and tls is None and not is_loopback(address):
        warnings.warn(f"the token travels to {address} in clear (no TLS): anyone on the path "
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
