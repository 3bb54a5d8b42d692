"""Admission and bounded refusal records (issue 13): ``policy.admit`` / ``policy.InFlight``,
``audit.RefusalCounter`` and the audit log's writer thread."""

from __future__ import annotations

import asyncio
import json

import pytest

from helseid_signer.audit import (
    MAX_REFUSAL_KINDS_PER_CALLER,
    AuditLog,
    RefusalCounter,
    verify_lines,
)
from helseid_signer.errors import RequestError
from helseid_signer.policy import Caller, InFlight, RateLimiter, admit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusal(caller: str | None, status: str = "RESOURCE_EXHAUSTED", error: str = "caller: rate limit") -> dict:
    return {"caller": caller, "profile": None, "purpose": "client_assertion", "outcome": "refused",
            "status": status, "error": error}  # fmt: skip


def test_admit_refuses_unknown_callers_and_callers_over_their_rate():
    with pytest.raises(RequestError) as caught:
        admit(None)
    assert caught.value.code == "UNAUTHENTICATED"
    clock = Clock()
    caller = Caller("app", frozenset({"p"}), RateLimiter(1.0, 2, clock=clock))
    assert admit(caller) is caller and admit(caller) is caller
    with pytest.raises(RequestError) as caught:
        admit(caller)
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    clock.now += 1.0
    assert admit(caller) is caller


def test_in_flight_limits_each_caller_on_its_own():
    running = InFlight()
    a, b = Caller("a", frozenset(), max_in_flight=2), Caller("b", frozenset(), max_in_flight=1)
    running.enter(a)
    running.enter(a)
    with pytest.raises(RequestError) as caught:
        running.enter(a)
    assert caught.value.code == "RESOURCE_EXHAUSTED" and "more than 2 requests in flight" in str(caught.value)
    running.enter(b)  # another caller is not affected
    running.leave(a)
    running.enter(a)
    assert running.running == {"a": 2, "b": 1}
    running.leave(a), running.leave(a), running.leave(b)
    assert running.running == {}


def test_refusal_counter_writes_the_first_of_each_kind_and_counts_the_rest():
    clock = Clock()
    counter = RefusalCounter(10.0, clock=clock)
    written = []
    for _ in range(500):
        written += counter.note(_refusal("flooder"))
        written += counter.note(_refusal(None, "UNAUTHENTICATED", "caller: is not a configured caller"))
    assert [r["caller"] for r in written] == ["flooder", None]  # the first of each kind
    assert counter.due() == []  # the interval has not ended
    clock.now += 10.0
    written = counter.note(_refusal("flooder"))  # the next interval: counts first, then its own record
    counts = {r["caller"]: r["count"] for r in written if r["outcome"] == "repeated"}
    assert counts == {"flooder": 499, None: 499}
    assert written[-1]["outcome"] == "refused"
    assert all(r["first_time"] and r["last_time"] and r["interval_s"] == 10.0 for r in written[:-1])
    assert counter.due(force=True) == []  # nothing repeated in the new interval yet


def test_refusal_counter_stays_bounded_whatever_the_messages():
    counter = RefusalCounter(10.0, clock=Clock())
    written = []
    for i in range(1000):  # one caller, a new message each time (messages may quote the request)
        written += counter.note(_refusal("flooder", "INVALID_ARGUMENT", f"htm: {i}"))
    # MAX_REFUSAL_KINDS_PER_CALLER kinds, then one shared kind for the rest of this caller's
    assert len(written) == MAX_REFUSAL_KINDS_PER_CALLER + 1
    assert counter.note(_refusal("other"))  # another caller's first refusal has its own record
    (rest,) = counter.due(force=True)
    assert (rest["caller"], rest["count"], rest["error"]) == ("flooder", 1000 - len(written), "(several messages)")


def test_repeated_records_are_in_the_hash_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), refusal_interval=10.0)

    async def run() -> None:
        await log.write_async({"caller": "app", "outcome": "signed", "jti": "x"})
        for _ in range(50):
            for entry in log.refusals.note(_refusal("flooder")):
                await log.write_async(entry)
        await asyncio.gather(
            *(log.write_async({"caller": "app", "outcome": "signed", "jti": str(i)}) for i in range(20))
        )

    asyncio.run(run())
    log.close()  # writes the count of the open interval
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["outcome"] for r in records].count("refused") == 1
    (repeated,) = [r for r in records if r["outcome"] == "repeated"]
    assert repeated["count"] == 49
    assert [r["seq"] for r in records] == list(range(1, 24))
    assert verify_lines(lines).ok


def test_write_async_fails_closed(tmp_path):
    log = AuditLog("/dev/full")

    async def run() -> None:
        await log.write_async({"caller": "app", "outcome": "signed"})

    from helseid_signer.audit import AuditError

    with pytest.raises(AuditError):
        asyncio.run(run())
    log.close()


def test_write_async_with_fsync_writes_on_the_writer_thread_in_one_chain(tmp_path):
    """With fsync the records go to the writer thread, several per write (group commit);
    each caller's await returns once its own record is in the file."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), fsync=True)
    in_file_on_return: list[bool] = []

    async def one(i: int) -> None:
        await log.write_async({"caller": "app", "outcome": "signed", "jti": f"jti-{i}"})
        # when this answer could go out, its record is in the file
        in_file_on_return.append(f'"jti":"jti-{i}"' in path.read_text())

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(run())
    log.close()
    lines = path.read_text().splitlines()
    assert sorted(json.loads(line)["jti"] for line in lines) == sorted(f"jti-{i}" for i in range(50))
    assert verify_lines(lines).ok and in_file_on_return == [True] * 50
