"""The shared-memory ring, producer and consumer in one process (two mappings)."""

from __future__ import annotations

import pytest

from engine.rings import MIN_CAPACITY, SHM_DIR, Ring, RingFull, record_size, sweep_orphans


def test_records_round_trip_across_the_wrap_point() -> None:
    consumer = Ring.create(MIN_CAPACITY)
    producer = Ring.attach(consumer.name)
    try:
        sent: list[tuple[list[int], bytes, bytes]] = []
        received: list[tuple[list[int], bytes, bytes]] = []
        for i in range(2000):  # many times the capacity: wraps repeatedly
            # Every third record carries extra bytes (what log-probabilities travel in).
            rec = ([i, -i], f"token {i} é".encode(), bytes(range(i % 3 * 5)))
            producer.write(*rec)
            sent.append(rec)
            if i % 7 == 0:
                received += consumer.read()[0]
        received += consumer.read()[0]
        assert received == sent
    finally:
        producer.close()
        consumer.close()
    assert not (SHM_DIR / consumer.name).exists()


def test_full_ring_refuses_and_flags_the_producer() -> None:
    consumer = Ring.create(MIN_CAPACITY)
    producer = Ring.attach(consumer.name)
    try:
        n = 0
        with pytest.raises(RingFull):
            while True:
                producer.write([], b"x" * 100)
                n += 1
        assert n == MIN_CAPACITY // record_size(b"x" * 100, 0)
        assert consumer.used() <= consumer.capacity
        records, producer_waiting = consumer.read()
        assert len(records) == n
        assert producer_waiting  # the consumer must send a resume frame
        assert consumer.read() == ([], False)
    finally:
        producer.close()
        consumer.close()


def test_wake_flag_is_reported_once_to_the_producer() -> None:
    consumer = Ring.create(MIN_CAPACITY)
    producer = Ring.attach(consumer.name)
    try:
        assert consumer.arm_wait()
        assert producer.write([], b"a") is True  # consumer was asleep: wake it
        assert producer.write([], b"b") is False
        assert not consumer.arm_wait()  # data present: do not sleep
    finally:
        producer.close()
        consumer.close()


def test_attach_rejects_foreign_names() -> None:
    with pytest.raises(ValueError):
        Ring.attach("../etc/passwd")


def test_sweep_removes_rings_of_dead_processes() -> None:
    path = SHM_DIR / "ferrous-ring-999999999-deadbeef"
    path.write_bytes(b"\0" * 64)
    assert "ferrous-ring-999999999-deadbeef" in sweep_orphans()
    assert not path.exists()
