import json
import math

import pytest

from temu_dist.atomic import write_atomic, write_json_atomic


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_undefined_metrics_are_written_as_null_in_strict_json(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"best": {"test": {"srcc": math.nan, "plcc": 0.5}}, "history": [{"loss": math.inf}, 1.5]})
    assert json.loads(path.read_text(), parse_constant=_refuse) == {
        "best": {"test": {"srcc": None, "plcc": 0.5}}, "history": [{"loss": None}, 1.5]}


def test_a_write_that_fails_leaves_the_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"epoch": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"epo')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_text_is_utf8_whatever_the_locale_and_a_non_utf8_file_name_keeps_its_bytes(tmp_path):
    import os

    from temu_dist.atomic import write_text_atomic

    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
    write_text_atomic(tmp_path / "scores.csv", f"path,score\nbü.png,0.5\n{name},0.25\n")
    assert (tmp_path / "scores.csv").read_bytes() == b"path,score\nb\xc3\xbc.png,0.5\ncaf\xe9.png,0.25\n"
