import subprocess
import sys

import rgflow_fast as rf
from rgflow_fast.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"rgflow-fast {rf.__version__}"


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends" in out and "device" in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "rgflow_fast", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("rgflow-fast ")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: rgflow-fast" in capsys.readouterr().out


def test_progress_bar_on_a_terminal_and_silence_when_disabled(monkeypatch):
    import io

    from rgflow_fast.training.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for enabled in (True, False):
        screen = Terminal()
        monkeypatch.setattr(sys, "stderr", screen)
        with Progress(3, "demo", enabled=enabled) as progress:
            for _ in range(3):
                progress.update(bpd=1.25)
        if enabled:
            assert "demo: 100%" in screen.getvalue() and "3/3" in screen.getvalue() and "bpd 1.25" in screen.getvalue()
        else:
            assert screen.getvalue() == ""  # --quiet and ranks other than 0
