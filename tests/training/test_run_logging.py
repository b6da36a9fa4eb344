"""metrics.jsonl on resume (k2_megatron.training.logging.history_until): cut in place before the first row past the
checkpoint's step or a row torn by a crash mid-write, the history rebuilt from the rows kept."""

from __future__ import annotations

import json

from k2_megatron.training.logging import history_until


def _write(path, rows, tail: str = "") -> list[str]:
    lines = [json.dumps(r) + "\n" for r in rows]
    path.write_text("".join(lines) + tail)
    return lines


def _train(step):
    return {"kind": "train", "step": step, "loss": 10.0 - step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1.0,
            "max_logit": None if step % 2 else 4.0 + step, "max_logits": {}}


def test_rows_past_the_step_are_cut_and_the_history_rebuilt(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [_train(1), _train(2), {"kind": "valid", "step": 2, "loss": 7.5}, _train(3), _train(4)]
    lines = _write(path, rows)
    history = history_until(str(path), 2)
    assert path.read_text() == "".join(lines[:3])
    assert history == {"train": [{"step": 1, "loss": 9.0, "lr": 1e-3, "grad_norm": 0.5, "max_logit": None},
                                 {"step": 2, "loss": 8.0, "lr": 1e-3, "grad_norm": 0.5, "max_logit": 6.0}],
                       "valid": [{"step": 2, "loss": 7.5}]}
    assert history_until(str(path), 2) == history and path.read_text() == "".join(lines[:3])  # idempotent


def test_a_row_torn_by_a_crash_is_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = _write(path, [_train(1), _train(2)], tail='{"kind": "train", "step": 3, "lo')
    history = history_until(str(path), 5)
    assert path.read_text() == "".join(lines) and [r["step"] for r in history["train"]] == [1, 2]


def test_no_file_no_history(tmp_path):
    assert history_until(str(tmp_path / "metrics.jsonl"), 3) == {"train": [], "valid": []}
    assert not (tmp_path / "metrics.jsonl").exists()
