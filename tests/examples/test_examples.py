"""The runnable examples run, learn, and show what they claim."""

import importlib.util

import pytest

from tests.helpers import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_muonclip_toy_learns_and_qk_clip_caps_the_max_logit():
    toy = load("muonclip_toy")
    clipped = toy.train(steps=120, tau=15.0, log_every=0)
    free = toy.train(steps=120, tau=None, log_every=0)
    assert clipped[0]["loss"] > 4.0 and clipped[-1]["loss"] < 0.2  # ln(64) = 4.16 -> learned
    assert free[-1]["loss"] < 0.2
    # Without QK-Clip the max logit keeps growing; with it, each step starts from logits clipped to tau, so
    # the forward's max stays within one update of tau.
    assert max(r["max_logit"] for r in free) > 40.0
    assert max(r["max_logit"] for r in clipped) < 15.0 * 1.25
    assert sum(r["clipped"] for r in clipped) > 0
