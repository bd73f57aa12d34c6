"""No traceback reaches a CLI user unless they ask for it (--debug)."""

from __future__ import annotations

import sys

import pytest

from loom_cli import app as cli


def _failing(exc: BaseException):  # type: ignore[no-untyped-def]
    def run(*args: object, **kwargs: object) -> None:
        raise exc

    return run


def test_an_unexpected_failure_is_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "app", _failing(TimeoutError()))
    monkeypatch.setattr(sys, "argv", ["loom", "runs"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 3  # the stack did not answer (docs/cli.md)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "no answer from the stack" in err and "--debug" in err


def test_a_bug_says_how_to_report_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "app", _failing(KeyError("steps")))
    monkeypatch.setattr(sys, "argv", ["loom", "show", "r"])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyError" in err and "--debug" in err


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "app", _failing(KeyError("steps")))
    monkeypatch.setattr(sys, "argv", ["loom", "show", "r", "--debug"])
    with pytest.raises(KeyError):
        cli.main()
    assert "--debug" not in sys.argv  # typer never sees it
