"""How the products write a share as a percentage: never "100" for a share below 1, never "0" for one above 0.

A Figure 3 caption read "100% on average below the last layer" for 99.5 %, which says that no prompt fell short.
Whole percents are kept where they are exact enough; only the ends get a decimal, or a bound.
"""

from __future__ import annotations


def percent(x: float) -> str:
    """100 x as text, without the sign: '37', '99.5', '>99.9', '0.4', '<0.1'; exactly 0 and 1 are '0' and '100'."""
    v = 100 * x
    if v != 100 and round(v) >= 100:
        text = f"{v:.1f}"
        return ">99.9" if text == "100.0" else text
    if v != 0 and round(v) <= 0:
        text = f"{v:.1f}"
        return "<0.1" if text == "0.0" else text
    return f"{v:.0f}"
