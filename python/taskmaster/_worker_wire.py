"""Hand-encoded pieces of the worker stream's WorkerMessage, shared by the worker and its pool
processes.

A result is encoded once, where its handler ran (in a pool process, for process handlers), as the
bytes of one `WorkerMessage.results` entry: the session then writes a batch of results as their
concatenation after the other fields, which protobuf reads as one message (repeated fields of
concatenated encodings append). The main process never builds a protobuf object per result.
No gRPC or protobuf imports here: pool processes import this module.
"""

from __future__ import annotations

# TaskResult.Outcome values (proto/taskmaster/v1/taskmaster.proto).
SUCCEEDED = 1
FAILED = 2
CANCELLED = 3
RETURNED = 4

OUTCOME_NAMES = {SUCCEEDED: "SUCCEEDED", FAILED: "FAILED", CANCELLED: "CANCELLED",
                 RETURNED: "RETURNED"}

# Longest error text the master keeps from a result (common/util.h, kMaxErrorBytes).
MAX_ERROR_BYTES = 4096
# Longest progress message the master keeps (common/limits.h, kMaxProgressMessageBytes).
MAX_PROGRESS_MESSAGE_BYTES = 256
# Room in a message for what comes with a result's output (worker.cc, kResultOverhead).
RESULT_OVERHEAD_BYTES = 4096

# Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
_RESULTS_TAG = b"\x1a"       # WorkerMessage.results = 3
_TASK_ID_TAG = b"\x08"       # TaskResult.task_id = 1
_ATTEMPT_TAG = b"\x10"       # TaskResult.attempt = 2
_OUTCOME_TAG = b"\x18"       # TaskResult.outcome = 3
_OUTPUT_TAG = b"\x22"        # TaskResult.output = 4
_ERROR_TAG = b"\x2a"         # TaskResult.error = 5
_PERMANENT_TRUE = b"\x30\x01"  # TaskResult.permanent = 6


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int_field(tag: bytes, n: int) -> bytes:
    # proto3 int32/int64/uint64: negatives travel as their 64-bit two's complement.
    return tag + _varint(n & 0xFFFFFFFFFFFFFFFF) if n else b""


def encode_result(task_id: int, attempt: int, outcome: int, output: bytes = b"",
                  error: str = "", permanent: bool = False) -> bytes:
    """One `WorkerMessage.results` entry, ready to be concatenated into a message."""
    body = [_int_field(_TASK_ID_TAG, task_id), _int_field(_ATTEMPT_TAG, attempt),
            _int_field(_OUTCOME_TAG, outcome)]
    if output:
        body += (_OUTPUT_TAG, _varint(len(output)), output)
    if error:
        text = valid_utf8(error, MAX_ERROR_BYTES)
        body += (_ERROR_TAG, _varint(len(text)), text)
    if permanent:
        body.append(_PERMANENT_TRUE)
    encoded = b"".join(body)
    return _RESULTS_TAG + _varint(len(encoded)) + encoded


def valid_utf8(text: str, max_bytes: int) -> bytes:
    """`text` as UTF-8, cut to at most `max_bytes` on a character boundary (a protobuf string must
    be valid UTF-8). Lone surrogates, which UTF-8 cannot carry, become '?'."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return data
    return data[:max_bytes].decode("utf-8", "ignore").encode("utf-8")
