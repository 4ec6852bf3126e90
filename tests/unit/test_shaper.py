"""The link shaper's rules without a link: loopback targets only, rate and duration parsing. (Rate, delay
and live changes through a real proxy: tests/component/test_shaper.py.)"""

from __future__ import annotations

import pytest

from coinfer.tools.shaper import Shaper, parse_duration, parse_rate


def test_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        Shaper(("10.0.0.1", 80))


@pytest.mark.parametrize(
    "text,bits", [("256kbit", 256e3), ("2mbit", 2e6), ("20Mbit/s", 20e6), ("1e6", 1e6), ("off", 0.0), ("2mbps", 2e6)]
)
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


def test_parse_bad_units():
    with pytest.raises(ValueError):
        parse_rate("fast")
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert parse_duration("40ms") == pytest.approx(0.04) and parse_duration("0.05s") == 0.05
