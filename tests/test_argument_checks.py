"""The shared argument checks: what they accept, what they refuse and what the message names."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys

import numpy as np
import pytest

from fastface_pl import argument_checks
from fastface_pl.argument_checks import check_bool, check_choice, check_int, check_real


def test_ints_are_returned_as_python_ints():
    assert check_int("workers", 0, 0) == 0
    value = check_int("workers", np.int64(3), 0)
    assert value == 3 and type(value) is int
    assert check_int("quality", 100, 1, 100) == 100
    assert check_int("max_decays", None, 0, allow_none=True) is None
    assert check_int("embedding_size", np.int32(512), 1) == 512


@pytest.mark.parametrize("call, message", [
    (lambda: check_int("batch_size", 0, 1), "batch_size must be an int >= 1, got 0"),
    (lambda: check_int("batch_size", True, 1), "batch_size must be an int >= 1, got True"),
    (lambda: check_int("batch_size", 2.0, 1), "batch_size must be an int >= 1, got 2.0"),
    (lambda: check_int("quality", 101, 1, 100), "quality must be an int in 1..100, got 101"),
    (lambda: check_int("max_decays", -1, 0, allow_none=True, none_means="unlimited"),
     r"max_decays must be an int >= 0 or None \(unlimited\), got -1"),
    (lambda: check_int("num_classes", 0, 1), "num_classes must be an int >= 1, got 0"),
    (lambda: check_real("alpha", 0.0, 0.0, 1.0), r"alpha must be a finite number in \(0, 1\], got 0.0"),
    (lambda: check_real("alpha", math.nan, 0.0, 1.0), r"alpha must be a finite number in \(0, 1\], got nan"),
    (lambda: check_real("decay", 1.0, 1.0), r"decay must be a finite number in \(1, inf\), got 1.0"),
    (lambda: check_real("min_lr", -1.0, 0.0, low_open=False), r"min_lr must be a finite number in \[0, inf\)"),
    (lambda: check_real("threshold", "5e-5"), r"threshold must be a finite number in \(-inf, inf\), got '5e-5'"),
    (lambda: check_bool("verbose", 1), "verbose must be True or False, got 1"),
    (lambda: check_choice("on_nonfinite", "ignore", ("skip", "raise")),
     "on_nonfinite must be one of 'skip', 'raise', got 'ignore'"),
])
def test_refusals_name_the_argument_what_is_allowed_and_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reals_accept_the_interval_ends_as_told():
    assert check_real("alpha", 1.0, 0.0, 1.0) == 1.0
    assert check_real("min_lr", 0, 0.0, low_open=False) == 0.0
    assert check_real("patience_fraction", None, 0.0, 1.0, allow_none=True) is None


def test_docstring_examples_run():
    assert doctest.testmod(argument_checks).failed == 0


def test_imports_neither_torch_nor_numpy():
    code = "import sys, fastface_pl.argument_checks; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
