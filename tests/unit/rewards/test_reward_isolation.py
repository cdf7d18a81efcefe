"""Fault containment: a user reward that hangs, raises, returns NaN or the wrong type, writes outside its
sandbox or opens a socket is contained, counted and logged; scoring goes on with the other samples."""

import logging

import pytest

from rewards.isolation import trusted_code_guard
from rewards.scoring import build_scorer
from rl.config.rewards import RewardConfig, ShapingConfig

MISBEHAVING = '''
import math, os, socket, time

def misbehave(prompt, completion, outside=None, **fields):
    if completion == "hang":
        time.sleep(60)
    if completion == "raise":
        raise RuntimeError("user bug")
    if completion == "nan":
        return math.nan
    if completion == "inf":
        return {"total": math.inf}
    if completion == "type":
        return "1.0"
    if completion == "write":
        with open(outside, "w") as f:
            f.write("escaped")
    if completion == "socket":
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    if completion == "subprocess":
        os.system("true")
    if completion == "inside":
        with open("scratch.txt", "w") as f:  # its own sandbox directory: allowed
            f.write("fine")
        return 0.5
    return 1.0
'''
CASES = ["ok", "hang", "raise", "nan", "inf", "type", "write", "socket", "subprocess", "inside", "ok"]


def test_each_fault_is_contained_counted_and_scoring_continues(tmp_path, make_batch, caplog):
    reward = tmp_path / "misbehaving.py"
    reward.write_text(MISBEHAVING)
    outside = tmp_path / "escaped.txt"
    cfg = RewardConfig(import_path=f"{reward}:misbehave", timeout_s=1.0, kwargs={"outside": str(outside)})
    batch = make_batch(CASES)
    with caplog.at_level(logging.WARNING), build_scorer([cfg], ShapingConfig()) as scorer:
        result = scorer.score(batch)
        again = scorer.score(make_batch(["ok"]))  # the killed worker was replaced
    assert result.total.tolist() == [1.0] + [0.0] * 8 + [0.5, 1.0]
    assert result.errors == {"misbehave": 8} and bool(result.keep.all())
    assert again.total.tolist() == [1.0]
    assert not outside.exists()
    causes = "\n".join(r.getMessage() for r in caplog.records)
    for expected in ("timed out after 1s", "user bug", "non-finite", "returned str", "writing", "network",
                     "starting processes"):
        assert expected in causes, expected


def test_fail_names_the_reward_and_the_cause(tmp_path, make_batch):
    from rl.errors import UserError

    reward = tmp_path / "misbehaving.py"
    reward.write_text(MISBEHAVING)
    cfg = RewardConfig(import_path=f"{reward}:misbehave", on_error="fail")
    with build_scorer([cfg], ShapingConfig()) as scorer, pytest.raises(UserError, match=r"'misbehave'.*user bug"):
        scorer.score(make_batch(["raise"]))


def test_audit_hook_rules(tmp_path):
    import os

    hook = trusted_code_guard(str(tmp_path))
    hook("open", (str(tmp_path / "a.txt"), "w", os.O_WRONLY))  # inside: allowed
    hook("open", ("/etc/hostname", "r", os.O_RDONLY))  # reading anywhere: allowed
    for event, args in [("open", ("/tmp/x", "w", 0)), ("open", ("/tmp/x", None, os.O_WRONLY | os.O_CREAT)),
                        ("os.remove", ("/tmp/x", -1)), ("os.rename", (str(tmp_path / "a"), "/tmp/b", -1, -1)),
                        ("socket.connect", (None, ("1.2.3.4", 80))), ("subprocess.Popen", ("ls", [], None, None))]:
        with pytest.raises(PermissionError):
            hook(event, args)
