"""Stop sequences on decoded text (service/search/stops.py)."""

from service.search.stops import cut_at_stop, first_stop, streamable


def test_the_earliest_stop_wins_and_is_not_returned():
    assert first_stop("abc##def;", ("#", ";")) == 3
    assert cut_at_stop("abc##def;", (";", "#")) == "abc"
    assert cut_at_stop("abc", ("x",)) == "abc" and first_stop("abc", ()) is None


def test_streaming_holds_back_a_tail_that_may_still_become_a_stop():
    stops = ("</end>", "\n\n")
    assert streamable("Hello </e", stops) == "Hello "  # "</e" may grow into "</end>"
    assert streamable("Hello\n", stops) == "Hello"
    assert streamable("Hello </x", stops) == "Hello </x"  # no stop starts like that
    assert streamable("Hello </end> more", stops) == "Hello "  # never past a stop
    assert streamable("Hello", ()) == "Hello"
