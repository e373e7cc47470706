"""python3 -m taskmaster: submit tasks and follow them where taskctl is not installed.

    python3 -m taskmaster submit --kind square 1 2 3 --wait
    seq 1 200000 | python3 -m taskmaster submit --kind square --wait
    python3 -m taskmaster wait JOB_ID
    python3 -m taskmaster status JOB_ID|TASK_ID
    python3 -m taskmaster cancel JOB_ID|TASK_ID
    python3 -m taskmaster stats

The master comes from --master or $TASKMASTER_ADDR, the token from --token-file or
$TASKMASTER_TOKEN. Output is taskctl's: the job id first, then one line per result (the output
of a task that succeeded, "task ID STATE: error" otherwise); --format json prints JSON lines.
Exit codes as taskctl's: 0 all succeeded, 1 a task ended DEAD or CANCELLED, 2 any other error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Iterator, List, Optional, Sequence, TextIO

from .client import Client, Result
from .errors import TaskmasterError

EXIT_OK, EXIT_TASK_FAILED, EXIT_ERROR = 0, 1, 2


def _lines(stream: TextIO) -> Iterator[str]:
    """One payload per non-empty line, read as it is submitted."""
    for line in stream:
        line = line.rstrip("\r\n")
        if line:
            yield line


def _printable(data: str) -> str:
    # What came from workers reaches a terminal: control characters are escaped.
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in data)


def _show(result: Result, as_json: bool, out: TextIO) -> None:
    if as_json:
        record = dataclasses.asdict(result)
        record["output"] = result.output.decode("utf-8", "backslashreplace")
        out.write(json.dumps(record) + "\n")
    elif result.ok:
        out.write(_printable(result.output.decode("utf-8", "backslashreplace")) + "\n")
    else:
        out.write(f"task {result.id} {result.state}: {_printable(result.error)}\n")


def _follow(client: Client, job_id: str, as_json: bool, out: TextIO) -> int:
    for result in client.job(job_id).results():
        _show(result, as_json, out)
    out.flush()
    status = client.job(job_id).status()
    return EXIT_OK if status.succeeded == status.total else EXIT_TASK_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m taskmaster",
                                     description="Submit tasks to a taskmaster master and "
                                                 "follow them.")
    parser.add_argument("--master", help="host:port of the master (default: $TASKMASTER_ADDR)")
    parser.add_argument("--token-file", help="file holding a token (default: $TASKMASTER_TOKEN)")
    parser.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="submit tasks; prints the job id first")
    submit.add_argument("--kind", required=True, help="handler name, e.g. square")
    submit.add_argument("payloads", nargs="*",
                        help="payloads (default: one per line of --file or stdin)")
    submit.add_argument("--file", help="read payloads one per line from this file ('-': stdin)")
    submit.add_argument("--queue", default="")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--delay", type=float, help="seconds before it may run")
    submit.add_argument("--timeout", type=float, help="execution timeout, seconds")
    submit.add_argument("--max-attempts", type=int, default=0)
    submit.add_argument("--key", help="idempotency key (several tasks: KEY/0, KEY/1 ...)")
    submit.add_argument("--label", action="append", default=[], metavar="K=V",
                        help="a label the worker must carry (repeatable)")
    submit.add_argument("--wait", action="store_true", help="follow the job, print each result")
    for name, what in (("wait", "follow a job, printing each result"),
                       ("status", "show a task or a job"),
                       ("cancel", "cancel a task, or every unfinished task of a job")):
        sub.add_parser(name, help=what).add_argument("id", help="job id or task id")
    sub.add_parser("stats", help="queue counts and workers")
    return parser


def _labels(pairs: Sequence[str]) -> dict:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"a label is KEY=VALUE, not {pair!r}")
        labels[key] = value
    return labels


def _run(args: argparse.Namespace, out: TextIO) -> int:
    as_json = args.format == "json"
    with Client(args.master, token_file=args.token_file, tls=args.tls_ca) as client:
        if args.command == "submit":
            if args.payloads and args.file:
                raise ValueError("give payloads as arguments or --file, not both")
            if args.payloads:
                payloads = iter(args.payloads)
                job = _submit(client, args, payloads)
            elif args.file and args.file != "-":
                with open(args.file, encoding="utf-8") as f:
                    job = _submit(client, args, _lines(f))
            else:
                job = _submit(client, args, _lines(sys.stdin))
            for warning in job.warnings:
                print(f"taskmaster: warning: {warning}", file=sys.stderr)
            out.write((json.dumps({"job_id": job.id}) if as_json else job.id) + "\n")
            out.flush()
            return _follow(client, job.id, as_json, out) if args.wait else EXIT_OK
        if args.command == "wait":
            return _follow(client, args.id, as_json, out)
        if args.command == "stats":
            stats = client.stats()
            if not stats.complete:
                print(f"taskmaster: warning: this counts {len(stats.partitions)} of the "
                      f"{stats.partition_count} partitions of the queues (a master taking some "
                      "over could not be reached)", file=sys.stderr)
            out.write(json.dumps(dataclasses.asdict(stats)) + "\n" if as_json else
                      "".join(f"{q.queue}: {q.pending} pending, {q.leased} leased, "
                              f"{q.succeeded} succeeded, {q.dead} dead\n" for q in stats.queues))
            return EXIT_OK
        if args.id.startswith("job-"):
            job = client.job(args.id)
            if args.command == "cancel":
                out.write(f"{job.cancel()} cancelled\n")
            else:
                out.write(json.dumps(dataclasses.asdict(job.status())) + "\n")
            return EXIT_OK
        if not args.id.isdigit():
            raise ValueError(f"{args.id!r} is neither a job id (job-...) nor a task id")
        task_id = int(args.id)
        if args.command == "cancel":
            out.write(f"{client.cancel_task(task_id)} cancelled\n")
        else:
            info = dataclasses.asdict(client.task(task_id))
            for field in ("output", "payload"):
                info[field] = info[field].decode("utf-8", "backslashreplace")
            out.write(json.dumps(info) + "\n")
        return EXIT_OK


def _submit(client: Client, args: argparse.Namespace, payloads: Iterator[str]):  # type: ignore
    return client.submit(args.kind, payloads, queue=args.queue, priority=args.priority,
                         delay=args.delay, timeout=args.timeout, max_attempts=args.max_attempts,
                         key=args.key, labels=_labels(args.label))


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, sys.stdout)
    except (TaskmasterError, ValueError, OSError) as e:
        message = e.message if isinstance(e, TaskmasterError) else str(e)
        print(f"taskmaster: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
