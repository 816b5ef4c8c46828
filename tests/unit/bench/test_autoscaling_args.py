"""The autoscaling benchmark's --targets option."""
import argparse

import pytest

from bench.autoscaling import targets


def test_targets_parse_names_and_numbers_and_refuse_anything_else():
    assert targets("ingress=1,retrieval=0.5") == {"ingress": 1.0, "retrieval": 0.5}
    assert targets("") == {}
    for bad in ("ingress", "ingress=fast", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=NUMBER"):
            targets(bad)
