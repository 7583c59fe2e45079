"""`rgflow-fast train`, `sample` and `eval` end to end on tiny models: the loss falls, the
run folder fills, resumption is exact, NaN stops the run, torchrun with gloo works, and bad
input is a clear error that leaves files untouched."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import rgflow_fast.training.loop as train_module
from rgflow_fast.checkpoint import load_checkpoint, load_model
from rgflow_fast.cli import main

TINY = [
    "--train-size", "64", "--test-size", "16", "--batch-size", "8", "--n-layers", "1",
    "--n-res-blocks", "1", "--n-mlp", "1", "--hidden", "8", "--backend", "torch", "--sample-n", "4",
    "--quiet", "--device", "cpu",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGFLOW_FAST_CACHE", str(tmp_path / "cache"))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (to show nothing was overwritten)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_run(tmp_path, seed, *extra, name="run"):
    out = tmp_path / name
    rc = main(["train", *TINY, "--seed", str(seed), "--out", str(out), *extra])
    assert rc == 0
    return out


def test_end_to_end(tmp_path, seed, capsys):
    run = _tiny_run(tmp_path, seed, "--steps", "16", "--lr", "0.02", "--log-every", "4", "--ckpt-every", "8", "--keep", "1")
    records = _metrics(run)
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    assert all(torch.isfinite(torch.tensor(r["bpd"])) for r in records)
    assert records[-1]["bpd"] < records[0]["bpd"] - 0.3, [r["bpd"] for r in records]
    assert records[-1]["test_bpd"] < records[1]["test_bpd"]
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "msds1" and config["steps_total"] == 16 and config["world_size"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000016.pt"]  # --keep 1
    # 4 samples in a 2×2 grid of 32 px images with torchvision's 2 px padding
    for step in (8, 16):
        assert Image.open(run / "samples" / f"step_{step:08d}.png").size == (70, 70)
    assert Image.open(run / "bpd.png").format == "PNG"

    ckpt = run / "checkpoints" / "step_00000016.pt"
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "9", "--temperature", "0.3", "0.5", "0.7", "0.9",
                 "--out", str(grid), "--device", "cpu"]) == 0
    assert Image.open(grid).size == (104, 104)
    single = tmp_path / "single.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "2", "--temperature", "1", "--out", str(single)]) == 0
    assert Image.open(single).size == (70, 36)

    capsys.readouterr()
    # with the training's evaluation batch (8) and noise seed (0), eval reproduces its test bits/dim
    assert main(["eval", "--checkpoint", str(ckpt), "--batch-size", "8", "--json", "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["dataset"] == "msds1"
    assert result["bpd"] == pytest.approx(records[-1]["test_bpd"], rel=1e-6)


def test_resume_is_exact(tmp_path, seed):
    # a constant lr: extending a run keeps its trajectory (a cosine schedule spans the run's --steps)
    args = ["--lr", "0.02", "--log-every", "1", "--ckpt-every", "2", "--train-size", "16",  # 2 steps an epoch
            "--lr-schedule", "constant"]
    straight = _tiny_run(tmp_path, seed, "--steps", "4", *args, name="straight")
    split = _tiny_run(tmp_path, seed, "--steps", "2", *args, name="split")
    assert main(["train", "--out", str(split), "--resume", "--steps", "4", "--quiet", "--backend", "torch"]) == 0

    a = load_checkpoint(straight / "checkpoints" / "step_00000004.pt")
    b = load_checkpoint(split / "checkpoints" / "step_00000004.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    # the moving weights really moved, so the equality above is not that of two fresh models
    fresh = load_checkpoint(split / "checkpoints" / "step_00000002.pt")
    assert any(not torch.equal(fresh["model"][k], b["model"][k]) for k in b["model"])
    assert [(r["step"], r["bpd"]) for r in _metrics(straight)] == [(r["step"], r["bpd"]) for r in _metrics(split)]


def test_resume_after_a_kill_is_exact_with_cosine_schedule(tmp_path, seed):
    args = ["--steps", "4", "--lr", "0.02", "--log-every", "1", "--ckpt-every", "2", "--lr-schedule", "cosine"]
    straight = _tiny_run(tmp_path, seed, *args, name="straight")
    killed = _tiny_run(tmp_path, seed, *args, name="killed")
    (killed / "checkpoints" / "step_00000004.pt").unlink()  # as if killed between steps 2 and 4
    assert main(["train", "--out", str(killed), "--resume", "--quiet", "--backend", "torch"]) == 0
    a = load_checkpoint(straight / "checkpoints" / "step_00000004.pt")
    b = load_checkpoint(killed / "checkpoints" / "step_00000004.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lrs = [r["lr"] for r in _metrics(killed)]
    assert lrs[0] == 0.02 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.002
    times = [r["time"] for r in _metrics(killed)]
    assert times == sorted(times)  # cumulative over the resumed session


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, seed, monkeypatch, capsys):
    calls = []
    real = train_module.preprocess

    def poisoned(x, generator=None):
        y, ldj = real(x, generator)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            calls.append(1)
            if len(calls) == 3:
                ldj = ldj * float("nan")
        return y, ldj

    monkeypatch.setattr(train_module, "preprocess", poisoned)
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--seed", str(seed), "--out", str(out), "--steps", "6", "--log-every", "1", "--ckpt-every", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "the loss is nan" in err and "at step 3" in err and "step_00000002.pt" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    model = load_model(out / "checkpoints" / "step_00000002.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torchrun_two_processes_gloo(tmp_path, seed):
    out = tmp_path / "ddp"
    env = {**os.environ, "RGFLOW_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    common = [*TINY, "--seed", str(seed), "--steps", "4", "--log-every", "1", "--ckpt-every", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rgflow_fast", "train", *common, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone writes: one metrics file with each step once; the trainer checks at every
    # checkpoint that both ranks hold the same weights and fails the run if not
    assert [p.name for p in out.rglob("metrics.jsonl")] == ["metrics.jsonl"]
    ddp = _metrics(out)
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert proc.stdout.count("training RGFlow") == 1
    # the 2×4 split of the global batch of 8 sees the same images as one process does; only
    # the dequantisation noise differs, so bits/dim agree closely
    single = _tiny_run(tmp_path, seed, "--steps", "4", "--log-every", "1", "--ckpt-every", "2", name="single")
    for r_ddp, r_one in zip(ddp, _metrics(single)):
        assert r_ddp["bpd"] == pytest.approx(r_one["bpd"], abs=0.05)
    load_model(out / "checkpoints" / "step_00000004.pt")


# ------------------------------------------------------------------------------- bad input


@pytest.fixture
def finished_run(tmp_path, seed):
    return _tiny_run(tmp_path, seed, "--steps", "2", "--ckpt-every", "2")


def test_unknown_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "imagenet", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_data_dir(tmp_path, capsys):
    rc = main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "rgflow-fast train: error:" in err and "nowhere does not exist" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint(finished_run, capsys):
    ckpt = finished_run / "checkpoints" / "step_00000002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a truncated file
    before = _snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--steps", "4"]) == 2
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(finished_run / "s.png")]) == 2
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("is corrupt or not a rgflow_fast checkpoint") == 3
    assert _snapshot(finished_run) == before


def test_checkpoint_not_matching_its_config(finished_run, tmp_path, capsys):
    payload = load_checkpoint(finished_run / "checkpoints" / "step_00000002.pt")
    payload["config"]["hidden"] = 16
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "s.png")]) == 2
    assert main(["train", "--resume", str(bad), "--out", str(tmp_path / "other"), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("does not match its own config") == 2
    assert not (tmp_path / "s.png").exists()


def test_resume_into_a_different_config(finished_run, capsys):
    before = _snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--steps", "4", "--hidden", "16", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "hidden: checkpoint (8,), now (16,)" in err and "now 0.1)" in err
    assert _snapshot(finished_run) == before


def test_existing_run_is_not_overwritten(finished_run, capsys):
    before = _snapshot(finished_run)
    assert main(["train", *TINY, "--out", str(finished_run), "--steps", "2"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(finished_run), "--resume", "--steps", "2"]) == 2
    assert "already reached step 2" in capsys.readouterr().err
    assert _snapshot(finished_run) == before


def test_other_bad_flags(tmp_path, finished_run, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "a"), "--amp"]) == 2
    assert "--amp trains in bf16 autocast on a CUDA device" in capsys.readouterr().err
    assert main(["train", *TINY, "--out", str(tmp_path / "b"), "--sample-temperature", "1", "2"]) == 2
    assert "--sample-temperature: a per-level temperature needs one value per RG level (4)" in capsys.readouterr().err
    assert main(["train", "--resume", "--steps", "4"]) == 2
    assert "pass --out" in capsys.readouterr().err
    ckpt = finished_run / "checkpoints" / "step_00000002.pt"
    assert main(["sample", "--checkpoint", str(ckpt), "--temperature", "1", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert "needs one value per RG level" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "s.png"))


# ------------------------------------------------------------------ what a new user runs into


def test_folder_without_checkpoint_starts_afresh(tmp_path, seed, capsys):
    """A run killed before its first checkpoint leaves config.json and metrics.jsonl: not a
    run, so both a plain rerun and --resume start afresh there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "bpd": 9.0}\n')
    assert main(["train", *TINY, "--seed", str(seed), "--out", str(out), "--steps", "2", "--ckpt-every", "2"]) == 0
    assert [r["step"] for r in _metrics(out)] == [2]
    (out / "checkpoints" / "step_00000002.pt").unlink()
    assert main(["train", *TINY, "--seed", str(seed), "--out", str(out), "--steps", "2", "--resume"]) == 0
    assert "holds no checkpoint" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["steps"] == 2


def test_backend_that_cannot_run_here_fails_before_writing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "run"
    flags = [a for a in TINY if a != "torch"]
    flags.remove("--backend")
    assert main(["train", *flags, "--out", str(out), "--steps", "2", "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rgflow-fast train: error: --backend cuda") and err.count("\n") == 1
    assert not out.exists()


def test_info_says_what_each_backend_runs_on(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available() and "triton" in out:
        assert "triton (interpreter only" in out or "triton (loads, but cannot run" in out


def test_progress_lines_without_a_terminal(tmp_path, seed, capsys, monkeypatch):
    monkeypatch.setattr("rgflow_fast.training.progress.LOG_SECONDS", 0.0)
    flags = [a for a in TINY if a != "--quiet"]
    assert main(["train", *flags, "--seed", str(seed), "--out", str(tmp_path / "run"), "--steps", "3",
                 "--ckpt-every", "3", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert [line.split(",")[0] for line in captured.err.splitlines() if line.startswith("train:")] == [
        "train: 1/3 steps", "train: 2/3 steps", "train: 3/3 steps"]
    assert "with 1 thread(s)" in captured.out and "step 3/3: bits/dim" in captured.out


def test_files_respect_the_umask(tmp_path, seed):
    old = os.umask(0o022)
    try:
        run = _tiny_run(tmp_path, seed, "--steps", "2", "--ckpt-every", "2")
    finally:
        os.umask(old)
    for path in [run / "config.json", run / "metrics.jsonl", run / "bpd.png",
                 run / "samples" / "step_00000002.png", run / "checkpoints" / "step_00000002.pt"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_python_users_load_a_run(finished_run):
    import rgflow_fast as rf

    model = rf.load_model(finished_run / "checkpoints" / "step_00000002.pt")
    pixels = rf.transforms.to_pixels(model.sample(3, temperature=1.5))
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1


def test_generated_dataset_rejects_data_dir(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--data-dir", "/nonexistent"]) == 2
    assert "msds1 is generated and reads no files: drop --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_untrusted_checkpoint_is_refused_with_the_reason(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "rgflow_fast/1", "x": Payload()}, evil)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    for path, message in [(evil, "was refused"), (noise, "is corrupt or not a rgflow_fast checkpoint")]:
        assert main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and "weights_only=False" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "ran").exists()


def test_resumed_banner_and_cumulative_time(finished_run, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(finished_run), "--resume", "--steps", "4", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 2 from" in out and "step_00000002.pt" in out
    times = [r["time"] for r in _metrics(finished_run)]
    assert times == sorted(times)


def test_float64_end_to_end(tmp_path, seed):
    run = _tiny_run(tmp_path, seed, "--steps", "2", "--ckpt-every", "2", "--dtype", "float64")
    ckpt = run / "checkpoints" / "step_00000002.pt"
    model = load_model(ckpt)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert json.loads((run / "config.json").read_text())["dtype"] == "float64"
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["eval", "--checkpoint", str(ckpt), "--batch-size", "8"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet", "--backend", "torch"]) == 0


def test_resume_a_run_written_by_version_0_1(finished_run):
    """Runs of rgflow_fast 0.1 nest the model flags under "model" in their saved config, and
    have neither dtype nor lr schedule (float32, constant)."""
    ckpt = finished_run / "checkpoints" / "step_00000002.pt"
    payload = load_checkpoint(ckpt)
    model_keys = ("kernel_size", "n_layers", "n_res_blocks", "n_mlp", "hidden", "prior")
    old = {k: v for k, v in payload["train"].items() if k not in model_keys + ("dtype", "lr_schedule")}
    payload["train"] = {**old, "model": {k: payload["train"][k] for k in model_keys}}
    torch.save(payload, ckpt)
    assert main(["train", "--out", str(finished_run), "--resume", "--steps", "3", "--quiet"]) == 0
    config = json.loads((finished_run / "config.json").read_text())
    assert config["n_layers"] == [1] and config["lr_schedule"] == "constant" and config["dtype"] == "float32"


def test_cuda_graphs_are_refused_before_anything_is_written(tmp_path):
    """--cuda-graphs needs a CUDA device: on the CPU the run stops with a one-line error and
    leaves no folder behind."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rgflow_fast", "train", "--device", "cpu", "--cuda-graphs", "--steps", "1",
         "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "--cuda-graphs captures the training step on a CUDA device" in result.stderr
    assert not out.exists()
