"""Long work says where it is without a terminal: one line per tenth (or per phase) with the
elapsed time, instead of tqdm's silence in a log file."""

from __future__ import annotations

import io

from medveil.progress import LogBar, bar, timed


def test_log_lines_every_tenth_and_once_for_a_phase():
    out = io.StringIO()
    b = LogBar(total=20, desc="federate", stream=out)
    for _ in range(20):
        b.update(1)
    b.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("medveil: federate: 5% (1/20), ")  # first step, then tenths
    assert lines[1].startswith("medveil: federate: 10% (2/20), ")
    assert lines[-1].startswith("medveil: federate: 100% (20/20)") and lines[-1].endswith(" s")
    phase = io.StringIO()
    for _ in LogBar(range(7), desc="stage 0: MIM pretraining", leave=False, stream=phase):
        pass
    assert phase.getvalue().splitlines() == [phase.getvalue().strip()]  # one line, at the end
    assert "100% (7/7)" in phase.getvalue() and "(done)" in phase.getvalue()
    stopped = io.StringIO()
    s = LogBar(total=10, desc="gan", stream=stopped)
    s.update(3)
    s.set_postfix(loss_g=1.23456)
    s.close()
    assert stopped.getvalue().splitlines()[-1].endswith("loss_g 1.235 (stopped)")


def test_bar_without_a_terminal_logs_and_disable_silences(capsys):
    assert isinstance(bar(total=3, desc="x"), LogBar)  # pytest's captured stderr is no terminal
    quiet = bar(range(3), desc="x", disable=True)
    assert not isinstance(quiet, LogBar) and list(quiet) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    totals: dict[str, float] = {}
    with timed(totals, "fit"):
        pass
    with timed(totals, "fit"):
        pass
    assert set(totals) == {"fit"} and totals["fit"] >= 0


def test_a_long_inner_phase_prints_its_tenths(monkeypatch):
    """An inner phase (leave=False) that runs long (MIM pretraining: minutes) is not silent."""
    from medveil import progress

    monkeypatch.setattr(progress, "LONG_PHASE", 0.0)
    out = io.StringIO()
    for _ in progress.LogBar(range(20), desc="stage 0: MIM pretraining", leave=False, stream=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].startswith("medveil: stage 0: MIM pretraining: 5% (1/20)")
    assert lines[-1].startswith("medveil: stage 0: MIM pretraining: 100% (20/20)")
