"""The derived-variable expression language: arithmetic as written, anything else refused."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from adapters.expressions import FUNCTIONS, MAX_DEPTH, parse
from dfm_prefect.core.errors import InvalidParametersError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("2 ** 3 ** 2", 512.0),
        ("-2 ** 2", -4.0),
        ("2 ** -1", 0.5),
        ("10 / 4 - 1.5e0", 1.0),
        ("--3", 3.0),
        ("+4", 4.0),
        (".5 + 1.", 1.5),
        ("sqrt(16) + abs(-2) + minimum(3, 9)", 9.0),
        ("clip(12, 0, 10)", 10.0),
        ("pi - pi", 0.0),
    ],
)
def test_arithmetic_follows_the_usual_precedence(text, expected):
    assert float(parse(text).evaluate({})) == pytest.approx(expected)


def test_expressions_read_variables_lazily_and_keep_nans_out_with_where():
    t = xr.DataArray(np.array([250.0, 300.0, np.nan]), dims="x").chunk()
    tree = parse("where(t > 273.15, (t - 273.15) * 1.8 + 32, nan)")
    assert tree.names() == {"t"}
    value = tree.evaluate({"t": t})
    assert value.chunks is not None  # still lazy
    np.testing.assert_allclose(value.values, [np.nan, (300 - 273.15) * 1.8 + 32, np.nan])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('true')", "unexpected character"),
        ("t.values", "unexpected character"),
        ("t[0]", "unexpected character"),
        ("eval(t)", "unknown function 'eval'"),
        ("getattr(t, 1)", "unknown function"),
        ("lambda: 1", "unexpected character"),
        ("sqrt(1, 2)", "takes 1 argument"),
        ("1 +", "expected 'more input'"),
        ("(1 + 2", r"expected '\)'"),
        ("1 2", "unexpected '2'"),
        ("", "non-empty"),
        ("x" * 2001, "longer than"),
        ("(" * (MAX_DEPTH + 2) + "1" + ")" * (MAX_DEPTH + 2), "nested too deeply"),
        ("-" * (MAX_DEPTH + 2) + "1", "nested too deeply"),
        ("+".join(["1"] * 300), "too large"),
    ],
)
def test_anything_outside_the_grammar_is_refused_before_running(text, message):
    with pytest.raises(InvalidParametersError, match=message):
        parse(text)


def test_unknown_names_fail_with_the_available_variables():
    with pytest.raises(InvalidParametersError, match=r"unknown name 'u'.*\['t'\]"):
        parse("u + 1").evaluate({"t": 1.0})


def test_every_allowed_function_takes_its_declared_arguments():
    for name, (arity, _) in FUNCTIONS.items():
        args = ", ".join(["0.5"] * arity) if name != "where" else "1 > 0, 1, 2"
        assert np.isfinite(float(parse(f"{name}({args})").evaluate({})))
