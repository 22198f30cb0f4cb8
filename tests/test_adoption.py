"""``stream.adoption`` in isolation: when a recovered partition opens an adoption window,
which snapshot a household takes, and that a partition's own state wins. The stream test is
``tests/test_input_growth.py`` (Kafka 4.0)."""

from __future__ import annotations

import time

import orjson
import pytest

from meterwatch.stream.adoption import WINDOW_S, Adoption, latest_elsewhere, window_end
from meterwatch.stream.households import HouseholdTable
from meterwatch.stream.recovery import read_to_end
from tests.conftest import create_topics_now, unique_settings

NOW = 1.9e9


def test_a_window_opens_without_a_mark_or_with_fewer_input_partitions() -> None:
    assert window_end(None, 8, NOW) == NOW + WINDOW_S
    assert window_end({"offset": 5, "input_partitions": 4}, 8, NOW) == NOW + WINDOW_S
    assert window_end({"offset": 5, "input_partitions": 8}, 8, NOW) is None
    assert window_end({"offset": 5}, 8, NOW) is None  # a mark from before this version
    open_one = {"offset": 5, "input_partitions": 8, "adopt_until": NOW + 60}
    assert window_end(open_one, 8, NOW) == NOW + 60  # reopened with its own end
    assert window_end({**open_one, "adopt_until": NOW - 1}, 8, NOW) is None


def _state(seq: int, level: float) -> bytes:
    table = HouseholdTable()
    h = int(table.lookup(["X"])[0])
    table.seq[h] = seq
    doc = table.snapshot(h)
    doc["level"] = level
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def test_a_household_takes_its_latest_snapshot_once_and_its_own_state_wins() -> None:
    elsewhere = latest_elsewhere({0: {"A": _state(3, 1.0), "B": _state(2, 2.0)},
                                  1: {"A": _state(5, 3.0), "C": _state(7, 4.0)}})
    assert {h: (p, orjson.loads(v)["seq"]) for h, (p, v) in elsewhere.items()} == \
        {"A": (1, 5), "B": (0, 2), "C": (1, 7)}
    table = HouseholdTable()
    table.lookup(["B"])  # B already has a state on this partition
    adoption = Adoption(1, elsewhere, NOW + 60)
    # on partition 1: A's and C's latest snapshots are this partition's own (not taken from
    # itself), B keeps the state it has here, "new" has none anywhere
    assert adoption.take(table, ["A", "B", "C", "new"]) == []
    adoption = Adoption(2, elsewhere, NOW + 60)
    taken = adoption.take(table, ["A", "B", "C", "new"])
    assert sorted(table.index.ids_of(taken)) == ["A", "C"] and adoption.adopted == 2
    a = int(table.lookup(["A"], insert=False)[0])
    assert int(table.seq[a]) == 5 and adoption.take(table, ["A"]) == []
    assert adoption.open(NOW) and not adoption.open(NOW + 61)


@pytest.mark.integration
async def test_state_partitions_not_made_yet_are_read_as_empty(broker):
    """After partitions are added to the input, a member may open its adoption window
    before another member has grown the state topic: the partitions that do not exist yet
    are read as empty at once, not waited for until recovery gives up (120 s)."""
    settings = unique_settings(broker, topic_partitions=2)
    create_topics_now(settings.bootstrap_servers, {settings.state_topic: 2})
    t0 = time.monotonic()
    tails = await read_to_end(settings, {(settings.state_topic, p): 0 for p in range(4)},
                              missing_ok=True, timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert {k[1]: (len(v.records), v.end) for k, v in tails.items()} == \
        {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)}
