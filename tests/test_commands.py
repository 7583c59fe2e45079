"""The analysis subcommands (``receptive-fields``, ``mix``, ``inpaint``, ``walk``) end to end on
a tiny model, and the one error style every command shares."""
import json
import math

import pytest
import torch

import rgflow_fast as rf
from conftest import randomize_
from rgflow_fast.analysis import latent_levels
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


def png_shape(path):
    from PIL import Image

    with Image.open(path) as image:
        return (len(image.getbands()), image.height, image.width)


def grid_side(n, L=8):
    return n * (L + 1) + 1  # padding=1


def test_mix(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    out = tmp_path / "mix.png"
    assert main(["mix", "--checkpoint", str(path), a, b, "--out", str(out), "--device", "cpu"]) == 0
    assert png_shape(out) == (3, grid_side(1), grid_side(model.n_levels + 1))
    assert "lambda" in capsys.readouterr().out
    assert main(["mix", "--checkpoint", str(path), png(tmp_path / "big.png", L=16), b, "--out", str(out)]) == 2
    assert "rgflow-fast mix: error:" in capsys.readouterr().err


def test_receptive_fields(tmp_path, checkpoint):
    path, model = checkpoint
    out = tmp_path / "rf"
    args = ["receptive-fields", "--checkpoint", str(path), "--out", str(out), "--per-level", "4",
            "--samples", "2", "--strengths", "--seed", "3", "--backend", "torch"]
    assert main(args) == 0
    levels = latent_levels(8, 4)
    for h in range(model.n_levels):
        n = min(4, int((levels == h).sum()))
        side = math.ceil(math.sqrt(n))
        assert png_shape(out / f"receptive_fields_level{h}.png") == (3, grid_side(math.ceil(n / side)), grid_side(side))
    stats = json.loads((out / "strengths.json").read_text())
    assert sum(s["count"] for s in stats) == 3 * 8 * 8


def test_inpaint_and_walk(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    image = png(tmp_path / "x.png")
    out = tmp_path / "inpainted.png"
    args = ["inpaint", "--checkpoint", str(path), image, "--box", "2", "3", "2", "2", "--out", str(out),
            "--starts", "2", "--steps", "2"]
    assert main(args) == 0
    assert png_shape(out) == (3, grid_side(1), grid_side(3))
    assert "varied" in capsys.readouterr().out
    assert main(args[:4] + ["--box", "7", "7", "2", "2"] + args[9:]) == 2
    assert "must lie inside the 8x8 image" in capsys.readouterr().err
    out = tmp_path / "walk.png"
    assert main(["walk", "--checkpoint", str(path), "--latent", "1", "4", "4", "--frames", "5", "--out", str(out)]) == 0
    assert png_shape(out) == (3, grid_side(1), grid_side(5))
    assert main(["walk", "--checkpoint", str(path), image, "--latent", "0", "0", "0", "--out", str(out)]) == 0


@pytest.mark.parametrize("command", ["receptive-fields", "mix", "inpaint", "walk", "sample", "eval"])
def test_every_command_gives_one_line_errors(tmp_path, checkpoint, capsys, command):
    """A missing checkpoint, a device this machine lacks: one line, status 2, nothing written."""
    path, _ = checkpoint
    image = png(tmp_path / "x.png")
    extra = {
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
