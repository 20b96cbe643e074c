import pytest

from pyshim.internal.cri_log import LogFormatError, parse_line, read_log


def test_full_and_partial_lines_parse():
    full = parse_line("2026-11-21T06:25:40.391207843+00:00 stdout F hello world\n")
    assert (full.stream, full.partial, full.text) == ("stdout", False, "hello world\n")
    part = parse_line("2026-11-21T06:25:40.391207843Z stderr P abc")
    assert (part.stream, part.partial, part.text) == ("stderr", True, "abc")


def test_text_keeps_inner_spaces_and_empty_lines():
    assert parse_line("t stdout F  two  spaces").text == " two  spaces\n"
    assert parse_line("t stdout F").text == "\n"


def test_format_round_trips():
    line = "2026-11-21T06:25:40.391207843Z stdout F counter 41\n"
    assert parse_line(line).format() == line
    partial = "2026-11-21T06:25:40.391207843Z stderr P no newline yet\n"
    assert parse_line(partial).format() == partial


@pytest.mark.parametrize("bad", ["garbage", "t stdin F x", "t stdout X x"])
def test_malformed_lines_are_refused(bad):
    with pytest.raises(LogFormatError):
        parse_line(bad)


def test_read_log_skips_bad_lines(tmp_path):
    path = tmp_path / "0.log"
    path.write_text("t stdout F a\nnonsense\nt stderr P b\nt stderr F c\n")
    assert [e.text for e in read_log(path)] == ["a\n", "b", "c\n"]
