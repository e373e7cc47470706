#!/usr/bin/env python3
"""Writes the seed inputs of each fuzz target into corpus/<target>/ (see each target's header).

Messages are written in protobuf text format and encoded with protoc, so the seeds follow the
proto file. Run it again after changing the seeds or the input layout of a target; the fuzz runs
work on a copy of the corpus, and what they find is not written here.
"""

import os
import random
import struct
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def encode(message_type, text):
    return subprocess.run(
        ["protoc", f"--encode=taskmaster.v1.{message_type}", f"-I{PROTO_DIR}",
         "taskmaster/v1/taskmaster.proto"],
        input=text.encode(), capture_output=True, check=True).stdout


def write(target, name, data):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


SUBMITS = {
    "one_task": 'tasks { kind: "square" payload: "7" }',
    "mixed_batch": '''
        tasks { kind: "square" payload: "1" priority: 3 }
        tasks { queue: "q2" kind: "echo" payload: "hello" delay_ms: 1500 max_attempts: 2 }
        tasks { kind: "echo" payload: "x" timeout_ms: 2000 labels { key: "gpu" value: "1" } }
        tasks { kind: "sleep" payload: "10" idempotency_key: "k1" }''',
    "repeated_key": '''
        tasks { kind: "square" payload: "2" idempotency_key: "same" }
        tasks { kind: "square" payload: "2" idempotency_key: "same" }
        tasks { kind: "square" payload: "3" idempotency_key: "other" }''',
    "key_conflict": '''
        tasks { kind: "square" payload: "2" idempotency_key: "same" }
        tasks { kind: "square" payload: "9" idempotency_key: "same" }''',
    "bad_names": '''
        tasks { queue: "no spaces" kind: "square" payload: "1" }
        tasks { kind: "" payload: "1" }''',
    "limits": '''
        tasks { kind: "a" max_attempts: 100 timeout_ms: 1 delay_ms: 1 }
        tasks { kind: "b" max_attempts: 101 }
        tasks { kind: "c" delay_ms: -1 }''',
    # The first task overflowed now + delay before delays were bounded.
    "extremes": '''
        tasks { kind: "a" priority: -2147483648 delay_ms: 9223372036854775807 }
        tasks { kind: "b" priority: 2147483647 timeout_ms: 9223372036854775807 }''',
    "many_classes": "".join(f'tasks {{ queue: "q{i}" kind: "k{i}" payload: "{i}" }}'
                            for i in range(8)),
}


def frame(control, argument, message_type, text):
    body = encode(message_type, text)
    return bytes([control, argument]) + struct.pack("<H", len(body)) + body


def worker(text, control=0, argument=0):
    return frame(control, argument, "WorkerMessage", text)


HELLO_1 = 'hello { worker_id: "w1" name: "one" host: "h1" kinds: "square" kinds: "echo" slots: 2 }'
HELLO_2 = ('hello { worker_id: "w2" kinds: "echo" kinds: "fail" queues: "default" queues: "q2" '
           'labels { key: "gpu" value: "1" } slots: 4 }')


def result(task, attempt, outcome, extra=""):
    return f'results {{ task_id: {task} attempt: {attempt} outcome: {outcome} {extra} }}'


WORKER_STREAMS = {
    # One worker runs what it gets, reports, and leaves with a bye.
    "run_and_leave": b"\0" + worker(HELLO_1 + " credits: 4") + worker(
        result(2, 1, "SUCCEEDED", 'output: "4"') + result(1, 1, "FAILED", 'error: "boom"') +
        " credits: 2 heartbeat: true heartbeat_at: 5") + worker(
            result(3, 1, "RETURNED") + result(6, 1, "CANCELLED"), control=0x02) + worker(
                "bye: true", control=0x10),
    # A stream breaks; the worker comes back with its secret and what it holds.
    "reconnect": b"\1" + worker(HELLO_1 + " credits: 2", control=0x10) + worker(
        'hello { worker_id: "w1" kinds: "square" slots: 2 master_epoch: "current" '
        'worker_secret: "current" held { task_id: 2 attempt: 1 } held { task_id: 1 attempt: 1 } }'
        " credits: 1") + worker(result(2, 1, "SUCCEEDED", 'output: "4"')),
    # Two workers; one goes silent until its leases expire, the other drains.
    "two_workers": b"\0" + worker(HELLO_1 + " credits: 3") + worker(
        HELLO_2 + " credits: 5", control=0x01) + worker(
            "heartbeat: true", control=0x07) + worker("heartbeat: true", control=0x07) + worker(
                "heartbeat: true draining: true", control=0x09) + worker(
                    result(4, 1, "FAILED", 'error: "no" permanent: true'), control=0x01),
    # Cancels, a resubmitted batch, a stale attempt, and the master shutting down.
    "cancel_and_shutdown": b"\1" + worker(HELLO_1 + " credits: 8", control=0x40, argument=3) +
    worker(result(3, 1, "CANCELLED") + result(1, 2, "SUCCEEDED"), control=0x20) + worker(
        "credits: 2", control=0x80),
    # Numbers at the ends of their ranges.
    "extremes": b"\1" + worker(
        'hello { worker_id: "w1" kinds: "square" kinds: "echo" slots: 100000 '
        'master_epoch: "current" held { task_id: 18446744073709551615 attempt: 2147483647 } }'
        " credits: 2147483647 heartbeat: true heartbeat_at: 9223372036854775807") + worker(
            result(18446744073709551615, -2147483648, "SUCCEEDED") + result(2, 2147483647, 99) +
            " credits: -2147483648 heartbeat: true heartbeat_at: -9223372036854775808",
            control=0x0e),
    # A stream that does not start with a hello, and hellos the broker refuses.
    "refused": b"\0" + worker("credits: 3") + worker(
        'hello { worker_id: "" kinds: "square" slots: 1 }') + worker(
            'hello { worker_id: "w3" kinds: "bad kind" slots: 1 }') + worker(
                'hello { worker_id: "w1" kinds: "square" slots: 0 }'),
}

TOKENS = {
    "roles": b"# tokens\nsubmit submit-token-0123456789\nwork   work-token-0123456789\n\n"
             b"admin\tadmin-token-0123456789\n\0Bearer submit-token-0123456789",
    "short_token": b"submit short\n\0Bearer short",
    "unknown_role": b"root root-token-0123456789\n\0Bearer  root-token-0123456789 ",
    "extra_field": b"submit submit-token-0123456789 tenant-a\n\0Basic abc",
    "crlf": b"work work-token-0123456789\r\n\0Bearer work-token-0123456789\r",
    "tenants": b"submit acme-token-0123456789 acme\nsubmit acme-next-token-0123456789 acme\n"
               b"admin admin-token-0123456789\nlimit acme max-pending=100 submit-rate=5\n"
               b"limit beta submit-rate=0\n\0Bearer acme-next-token-0123456789",
}

TEXTS = {
    "ascii": b"\x10hello, world",
    "utf8": "\x08caf\u00e9 \u65e5\u672c \U0001F600".encode(),
    "controls": b"\x20a\x1b[2Jb\x7f\xc2\x85c\xed\xa0\x80\xf4\x90\x80\x80\xe0\x80",
    "labels": b"\x40 gpu = 1, zone=eu-west ,,bad key=x",
    "addresses": b"\x0c[::1]:50051",
    "duration": b"\x041.5m",
    # Found by fuzz_text: 2.2e23 ms, beyond what llround can give, parsed as a negative duration.
    "duration_overflow": b"\x1e" + b"2" * 21,
}


def main():
    for name, text in SUBMITS.items():
        write("fuzz_submit", name, encode("SubmitRequest", text))
    for name, data in WORKER_STREAMS.items():
        write("fuzz_worker_stream", name, data)
    # fuzz_store_records reads its input with FuzzedDataProvider, whose choices come from the end
    # of the input: seeds of random bytes (fixed, so this script writes the same files) give it
    # varied tables to start from.
    rng = random.Random(20240601)
    for i, size in enumerate([64, 256, 512, 1024, 2048]):
        write("fuzz_store_records", f"random_{i}", bytes(rng.randrange(256) for _ in range(size)))
    for name, data in TOKENS.items():
        write("fuzz_tokens", name, data)
    for name, data in TEXTS.items():
        write("fuzz_text", name, data)


if __name__ == "__main__":
    main()
