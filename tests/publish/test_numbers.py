"""Percentages in the products (publish/numbers.py): a share below 1 never reads 100, one above 0 never reads 0."""

import pytest

from blens.publish.numbers import percent


@pytest.mark.parametrize("share, text", [
    (0.0, "0"), (1.0, "100"), (0.3745, "37"), (0.5, "50"),
    (0.995, "99.5"), (0.99949, "99.9"), (0.9996, ">99.9"),  # the Figure 3 caption read "100%" for 0.995
    (0.9995, ">99.9"), (0.99951, ">99.9"), (0.004, "0.4"), (0.0004, "<0.1"),
])
def test_the_ends_are_never_rounded_onto_0_or_100(share, text):
    assert percent(share) == text
