"""Every command of the README runs as written against the quick-start run (here a tiny run
in its place), and the README's names of the quick start agree with the preset."""
import re
import shlex
from pathlib import Path

import pytest
import torch

from rgflow_fast.cli import main
from rgflow_fast.training import PRESETS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TINY = ["--train-size", "64", "--test-size", "16", "--batch-size", "8", "--n-layers", "1", "--n-res-blocks", "1",
        "--n-mlp", "1", "--hidden", "8", "--sample-n", "4", "--quiet", "--device", "cpu", "--threads", "1"]


def _commands():
    """``rgflow-fast`` lines of the README's indented code blocks (synopses with [...] aside)."""
    lines = [line.strip() for line in README.splitlines() if line.startswith("    ")]
    return [line.split(" # ")[0].strip() for line in lines if line.startswith("rgflow-fast ") and "[" not in line]


def test_quick_start_names_agree_with_the_preset():
    assert "    pip install . && rgflow-fast train --out runs/quickstart --threads 1\n" in README
    checkpoint = re.search(r"`C=(runs/quickstart/checkpoints/step_(\d+)\.pt)`", README)
    assert checkpoint and int(checkpoint.group(2)) == PRESETS["small"]["steps"]
    assert "(docs/quickstart_samples.png)" in README
    assert (Path(__file__).resolve().parents[1] / "docs" / "quickstart_samples.png").is_file()


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RGFLOW_FAST_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    assert main(["train", "--out", "runs/quickstart", "--steps", "2", "--ckpt-every", "2", *TINY]) == 0
    path = re.search(r"`C=(\S+)`", README).group(1)
    Path(path).parent.joinpath("step_00000002.pt").rename(path)  # the tiny run stands in for the quick start
    commands = _commands()
    assert len(commands) >= 8, commands
    for line in commands:
        argv = shlex.split(line.replace("$C", path))[1:]
        assert main(argv) == 0, line
    torch.set_num_threads(threads)
