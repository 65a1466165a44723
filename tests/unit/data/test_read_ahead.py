"""EpochReader: every epoch's items once, in order, read ahead across epoch boundaries."""

import threading
import time

import pytest

from llava_platform.data.read_ahead import EpochReader


def test_items_arrive_per_epoch_in_order():
    with EpochReader(lambda epoch: [f"{epoch}-{i}" for i in range(3)], first_epoch=1, epochs=4, depth=2) as reader:
        assert [list(reader.items(epoch)) for epoch in (1, 2, 3)] == [[f"{e}-{i}" for i in range(3)] for e in (1, 2, 3)]
        assert list(reader.items(4)) == []  # past the last epoch


def test_an_epoch_left_early_is_skipped_not_replayed():
    with EpochReader(lambda epoch: range(epoch * 10, epoch * 10 + 5), first_epoch=0, epochs=2, depth=3) as reader:
        first = reader.items(0)
        assert [next(first), next(first)] == [0, 1]
        assert list(reader.items(1)) == [10, 11, 12, 13, 14]


def test_next_epoch_is_read_while_this_one_is_consumed():
    started: list[int] = []

    def read_epoch(epoch):
        started.append(epoch)
        return range(2)

    with EpochReader(read_epoch, first_epoch=0, epochs=2, depth=4) as reader:
        assert next(reader.items(0)) == 0
        deadline = time.monotonic() + 5
        while started != [0, 1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == [0, 1]  # epoch 1 began before epoch 0 was finished


def test_reader_errors_reach_the_consumer():
    def read_epoch(epoch):
        yield 1
        raise OSError("shard vanished")

    with EpochReader(read_epoch, first_epoch=0, epochs=1, depth=1) as reader, pytest.raises(OSError, match="vanished"):
        list(reader.items(0))


def test_close_stops_the_thread_while_it_waits_on_a_full_queue():
    reader = EpochReader(lambda epoch: range(10**9), first_epoch=0, epochs=1, depth=1)
    next(reader.items(0))
    reader.close()
    assert not any(t.name == "epoch-reader" and t.is_alive() for t in threading.enumerate())
