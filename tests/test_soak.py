"""A short soak of the real server (bench/soak.py): 4 API clients, 24 requests, while LoRA files
are rewritten in place, truncated and deleted under it and the model is switched. The server stays
up, answers every request without a 5xx, first come first served, and the image of a prompt
without LoRAs is pixel-identical at the start and the end (the weights came back to base)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakPlan, prepare_folder, run_soak


@pytest.mark.slow
def test_server_survives_a_soak_with_files_changing_under_it(tmp_path: Path) -> None:
    prepare_folder(tmp_path)
    # 24 requests as fast as answered, 2 model switches among them, ~150 file changes (the
    # acceptance soak, `python -m bench.soak`, sends 200)
    plan = SoakPlan(requests=24, clients=4, seconds=60, switches=2, paced=False)
    report = run_soak(tmp_path, plan)

    assert report.server_alive, (
        f"the server died (exit {report.exit_code}):\n{report.server_log_tail}"
    )
    assert not report.server_errors, (report.server_errors[:5], report.server_log_tail)
    assert len(report.answers) >= plan.requests // 2, f"only {len(report.answers)} in 60 s"
    assert report.mutations > 20  # the files really changed while requests ran
    assert not report.fifo_violations, report.fifo_violations[:5]
    assert report.base_image_identical
