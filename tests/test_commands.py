"""The analysis subcommands (``receptive-fields``, ``mix``, ``inpaint``, ``walk``) end to end on
a tiny model, and the one error style every command shares."""
import json

import pytest
import torch

import rgflow_fast as rf
from conftest import randomize_
from rgflow_fast.checkpoint import save_checkpoint
from rgflow_fast.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and stays fast on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = randomize_(rf.RGFlow(8, 3, 4, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=8), 0.1)
    return save_checkpoint(tmp_path / "model.pt", model), model


def png(path, L=8, channels=3):
    import torchvision

    torchvision.utils.save_image(torch.rand(channels, L, L), path)
    return str(path)


def is_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 100  # a figure, not a bare grid


def test_mix(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    out = tmp_path / "mix.png"
    assert main(["mix", "--checkpoint", str(path), a, b, "--out", str(out), "--device", "cpu"]) == 0
    assert is_png(out)
    assert "lambda" in capsys.readouterr().out
    assert main(["mix", "--checkpoint", str(path), png(tmp_path / "big.png", L=16), b, "--out", str(out)]) == 2
    assert "rgflow-fast mix: error:" in capsys.readouterr().err


def test_receptive_fields(tmp_path, checkpoint):
    path, model = checkpoint
    out = tmp_path / "rf"
    args = ["receptive-fields", "--checkpoint", str(path), "--out", str(out), "--per-level", "4",
            "--samples", "2", "--strengths", "--seed", "3", "--backend", "torch"]
    assert main(args) == 0
    assert is_png(out / "receptive_fields.png")
    stats = json.loads((out / "strengths.json").read_text())
    assert sum(s["count"] for s in stats) == 3 * 8 * 8


def test_inpaint_and_walk(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    image = png(tmp_path / "x.png")
    out = tmp_path / "inpainted.png"
    args = ["inpaint", "--checkpoint", str(path), image, "--box", "2", "3", "2", "2", "--out", str(out),
            "--starts", "2", "--steps", "2"]
    assert main(args) == 0
    assert is_png(out)
    assert "varied" in capsys.readouterr().out
    assert main(args[:4] + ["--box", "7", "7", "2", "2"] + args[9:]) == 2
    assert "must lie inside the 8x8 image" in capsys.readouterr().err
    out = tmp_path / "walk.png"
    assert main(["walk", "--checkpoint", str(path), "--latent", "1", "4", "4", "--frames", "5", "--out", str(out)]) == 0
    assert is_png(out) and "from -4 to 4" in capsys.readouterr().out  # ±4σ of the prior at T = 1
    assert main(["walk", "--checkpoint", str(path), image, "--latent", "0", "0", "0", "--out", str(out)]) == 0


@pytest.mark.parametrize("command", ["receptive-fields", "mix", "inpaint", "walk", "latent-correlation", "sample",
                                     "eval"])
def test_every_command_gives_one_line_errors(tmp_path, checkpoint, capsys, command):
    """A missing checkpoint, a device this machine lacks: one line, status 2, nothing written."""
    path, _ = checkpoint
    image = png(tmp_path / "x.png")
    extra = {
        "latent-correlation": ["--out", str(tmp_path / "o.png")],
        "receptive-fields": ["--out", str(tmp_path / "o")], "mix": [image, image, "--out", str(tmp_path / "o.png")],
        "inpaint": [image, "--box", "0", "0", "2", "2", "--out", str(tmp_path / "o.png")],
        "walk": ["--latent", "0", "0", "0", "--out", str(tmp_path / "o.png")],
        "sample": ["--out", str(tmp_path / "o.png")], "eval": [],
    }[command]
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["--checkpoint", str(path), "--device", "nope"], "unknown --device 'nope'"),
    ]
    if not torch.cuda.is_available():  # a device error, never "corrupt"
        cases.append((["--checkpoint", str(path), "--device", "cuda"], "torch sees no CUDA device"))
    for flags, message in cases:
        assert main([command, *flags, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rgflow-fast {command}: error:") and message in err and err.count("\n") == 1, err
        assert "corrupt" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_device_auto_loads_a_good_checkpoint(tmp_path, checkpoint):
    path, _ = checkpoint
    assert main(["sample", "--checkpoint", str(path), "--n", "2", "--temperature", "0.5", "--device", "auto",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["walk", "--checkpoint", str(path), "--latent", "0", "0", "0", "--device", "auto",
                 "--out", str(tmp_path / "w.png")]) == 0


def test_analysis_input_errors(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = str(tmp_path / "o.png")
    assert main(["mix", "--checkpoint", str(path), str(tmp_path / "no.png"), png(tmp_path / "b.png"), "--out", out]) == 2
    assert "image" in capsys.readouterr().err
    assert main(["walk", "--checkpoint", str(path), "--latent", "0", "9", "0", "--out", out]) == 2
    assert "--latent 0 9 0 is outside the model's latents" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert main(["walk", "--checkpoint", str(path), str(tmp_path / "text.png"), "--latent", "0", "0", "0",
                 "--out", out]) == 2
    assert "not a readable PNG" in capsys.readouterr().err


def test_latent_correlation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RGFLOW_FAST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "1", "--train-size", "8", "--test-size", "8",
                 "--batch-size", "8", "--n-layers", "1", "--n-res-blocks", "1", "--n-mlp", "1", "--hidden", "8",
                 "--sample-n", "1", "--quiet", "--device", "cpu"]) == 0
    ckpt = run / "checkpoints" / "step_00000001.pt"
    out = tmp_path / "corr.png"
    assert main(["latent-correlation", "--checkpoint", str(ckpt), "--images", "40", "--batch-size", "16",
                 "--level", "2", "--out", str(out)]) == 0
    assert is_png(out) and "level 2: 144 latents over 40 images" in capsys.readouterr().out  # 3 × 48 positions
    assert main(["latent-correlation", "--checkpoint", str(ckpt), "--level", "9", "--out", str(out)]) == 2
    assert "level must be an int in [0, 4)" in capsys.readouterr().err


def test_non_positive_counts_are_one_line_errors(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    for argv, flag in [
        (["sample", "--n", "0", "--out", str(tmp_path / "s.png")], "--n"),
        (["eval", "--batch-size", "0"], "--batch-size"),
        (["latent-correlation", "--batch-size", "0", "--out", str(tmp_path / "c.png")], "--batch-size"),
        (["walk", "--latent", "0", "0", "0", "--threads", "0", "--out", str(tmp_path / "w.png")], "--threads"),
    ]:
        assert main([argv[0], "--checkpoint", str(path), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be >= 1; got 0" in err and err.count("\n") == 1, err
