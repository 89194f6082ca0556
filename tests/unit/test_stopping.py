"""StopMatcher: stop strings across token boundaries, text held back only while it could
still become a stop."""

from tursi.engine.stopping import StopMatcher


def feed_all(matcher, pieces):
    """Feed pieces until a stop matches; return (released text, stopped)."""
    out = []
    for piece in pieces:
        check = matcher.feed(piece)
        out.append(check.text)
        if check.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_inside_one_piece():
    check = StopMatcher(["END"]).feed("The ENDgame")
    assert check.stopped is True
    assert check.text == "The "


def test_stop_spanning_pieces():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("Hello\n").text == "Hello"  # "\n" held: it may start the stop
    check = matcher.feed("\nWorld")
    assert check.stopped is True
    assert check.text == ""


def test_stop_spanning_many_pieces():
    text, stopped = feed_all(
        StopMatcher(["THE END"]), ["and ", "T", "H", "E", " ", "E", "N", "D", "!"]
    )
    assert (text, stopped) == ("and ", True)


def test_several_stops_earliest_wins():
    check = StopMatcher(["world", "lo"]).feed("hello world")
    assert check.stopped is True
    assert check.text == "hel"
    # Same when the earlier one is listed second and the later one is longer.
    check = StopMatcher(["o wor", "ell"]).feed("hello world")
    assert check.text == "h"


def test_overlapping_stops_across_pieces():
    # "abc" is held whole (prefix of "abcx"); then "bcd" completes starting one char in.
    text, stopped = feed_all(StopMatcher(["bcd", "abcx"]), ["xabc", "d"])
    assert (text, stopped) == ("xa", True)


def test_partial_prefix_is_held_then_released():
    matcher = StopMatcher(["STOP"])
    first = matcher.feed("go ST")
    assert first == type(first)("go ", False)
    second = matcher.feed("ART now")  # "STA..." is not "STOP": the held "ST" comes out
    assert second.stopped is False
    assert second.text == "START now"


def test_hold_back_longest_partial_prefix():
    matcher = StopMatcher(["aab"])
    assert matcher.feed("a").text == ""
    assert matcher.feed("a").text == ""
    assert matcher.feed("a").text == "a"  # "aaa": only the last "aa" can still start "aab"
    check = matcher.feed("b")
    assert check.stopped is True
    assert check.text == ""


def test_flush_releases_held_text():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("end\n").text == "end"
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""


def test_no_stops_passes_everything():
    matcher = StopMatcher(None)
    assert matcher.feed("abc") == type(matcher.feed(""))("abc", False)
    assert matcher.flush() == ""
    # Empty stop strings are ignored rather than matching everywhere.
    assert StopMatcher([""]).feed("abc").stopped is False


def test_concatenation_is_the_text_before_the_first_stop():
    text = "one two three four five"
    for stop in ["two", "o t", "four five", "e f", "five"]:
        for size in (1, 2, 3, 5):
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            assert feed_all(StopMatcher([stop]), pieces) == (text[: text.find(stop)], True)
    assert feed_all(StopMatcher(["six"]), [text[i : i + 2] for i in range(0, len(text), 2)]) == (
        text,
        False,
    )


def test_same_stop_twice_cuts_at_the_first():
    check = StopMatcher(["END"]).feed("one END two END three")
    assert (check.text, check.stopped) == ("one ", True)


def test_nothing_after_a_stop_is_held_for_flush():
    matcher = StopMatcher(["\n\n", "STOP"])
    assert matcher.feed("Hello ST").text == "Hello "  # "ST" held: it may start "STOP"
    check = matcher.feed("\n\nWorld")  # "ST" will not be "STOP", but "\n\n" is a stop
    assert (check.text, check.stopped) == ("ST", True)
    assert matcher.flush() == ""  # the held text went out before the stop; "World" never
