"""rgflow_fast.figures: each figure is written as a non-empty PNG, shows the analysis' values
(the arrays drawn are checked against the inputs) and carries its labels (titles, colour-bar
labels and tick labels are read back from the figure)."""
import pytest
import torch

pytest.importorskip("matplotlib", reason="the figures need matplotlib: pip install matplotlib")
import matplotlib  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import rgflow_fast as rf  # noqa: E402
from rgflow_fast import analysis, figures  # noqa: E402
from rgflow_fast.transforms import logit_transform, to_pixels  # noqa: E402

from conftest import randomize_  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("reference_one_thread")


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib Figures the functions save, in order."""
    saved = []
    original = figures._save

    def keep(fig, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def assert_png(path, min_side=100):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    with Image.open(path) as image:
        assert min(image.size) >= min_side and image.mode in ("RGB", "RGBA")
        # not blank: a figure of images, labels and a colour bar has many colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def small_model(L=16, C=3, k=4):
    return randomize_(rf.RGFlow(L, C, kernel_size=k, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=8).double())


def image_axes(fig):
    """Axes holding an image, in creation order (colour-bar axes hold none)."""
    return [ax for ax in fig.axes if ax.images]


@pytest.mark.parametrize("C", [1, 3])
def test_receptive_fields_figure(seed, tmp_path, drawn, C):
    model = small_model(C=C)
    picks = analysis.pick_latents(model, per_level=5)
    fields = analysis.receptive_fields(model, picks, 3)
    path = figures.receptive_fields_figure(fields, picks, tmp_path / "rf" / "fields.png", kernel_size=4, n_samples=3)
    assert path == tmp_path / "rf" / "fields.png"
    assert_png(path)
    fig = drawn[-1]
    words = texts(fig)
    levels = analysis.latent_levels(16, 4)
    for (c, i, j), field in zip(picks, fields):
        h = int(levels[i, j])
        title = f"L{h} ({i},{j}) c{c}\nmax|RF| {float(field.abs().max()):.2g}"
        assert title in words
    for h in range(model.n_levels):
        assert f"level {h}" in words
    assert any("RF / max|RF| of the tile" in w for w in words)  # the colour bar's label
    assert any("mean over 3 prior samples" in w for w in words)
    # the tiles show the fields, each scaled to its own maximum
    tiles = image_axes(fig)
    assert len(tiles) == len(picks)
    for ax, field in zip(tiles, fields):
        shown = torch.as_tensor(ax.images[0].get_array().data, dtype=torch.float64)
        unit = field / field.abs().max()
        expected = (0.5 + 0.5 * unit).permute(1, 2, 0) if C == 3 else unit[0]
        torch.testing.assert_close(shown, expected.float().double(), rtol=0, atol=1e-6)


def test_walk_figure(seed, tmp_path, drawn):
    model = small_model()
    x = model.sample(1)[0]
    c, i, j = 2, 0, 8  # a top-level latent (level 2 at L = 16, k = 4)
    values = analysis.walk_values(model, i, j)
    frames = analysis.walk(model, x, i, j, c)
    with torch.no_grad():
        own = float(model(x[None])[0][0, c, i, j])
    path = figures.walk_figure(frames, values, tmp_path / "walk.png", latent=(c, i, j), kernel_size=4,
                               original=x, original_value=own)
    assert_png(path)
    fig = drawn[-1]
    words = texts(fig)
    for v in values.tolist():
        assert f"z = {v:+.2f}" in words
    assert f"original\nz = {own:+.2f}" in words
    assert any(f"latent (channel {c}, i={i}, j={j}), RG level 2" in w for w in words)
    assert any("|frame − original| (/255)" in w for w in words)
    axes = image_axes(fig)
    assert len(axes) == 1 + 2 * len(values)
    pixels = to_pixels(frames.float())
    # the change row: 255 · max over channels |frame − original|
    for ax, frame in zip(axes[1 + len(values):], pixels):
        shown = torch.as_tensor(ax.images[0].get_array().data)
        torch.testing.assert_close(shown, 255 * (frame - to_pixels(x.float())).abs().amax(dim=0), rtol=1e-5, atol=1e-4)
    # without the original: one row of frames
    figures.walk_figure(frames, values, tmp_path / "plain.png", latent=(c, i, j), kernel_size=4)
    assert len(image_axes(drawn[-1])) == len(values)
    with pytest.raises(ValueError, match="one value per frame"):
        figures.walk_figure(frames, values[:3], tmp_path / "bad.png", latent=(c, i, j), kernel_size=4)


def test_mix_figure(seed, tmp_path, drawn):
    model = small_model(C=1)
    x_a, x_b = model.sample(2).split(1)
    frames = torch.cat([analysis.mix(model, x_a, x_b, lam) for lam in range(model.n_levels + 1)])
    path = figures.mix_figure(frames, tmp_path / "mix.png", image_a=x_a[0], image_b=x_b[0])
    assert_png(path)
    fig = drawn[-1]
    words = texts(fig)
    n = model.n_levels
    assert "λ = 0\nall from A" in words and f"λ = {n}\nall from B" in words
    for lam in range(1, n):
        assert f"λ = {lam}\nh≥{lam} A, h<{lam} B" in words
    assert "A\n(large scales)" in words and "B\n(fine scales)" in words
    axes = image_axes(fig)
    assert len(axes) == n + 3
    for ax, frame in zip(axes[1:-1], to_pixels(frames.float())):
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), frame[0])
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        figures.mix_figure(torch.zeros(3, 2, 8, 8), tmp_path / "bad.png")


def test_inpaint_figure(seed, tmp_path, drawn):
    model = small_model()
    x = model.sample(2)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:9, 3:7] = True
    result, n_varied = analysis.inpaint(model, x, mask, n_starts=2, steps=1)
    path = figures.inpaint_figure(x, mask, result, tmp_path / "inpaint.png", n_varied=n_varied,
                                  num_dims=model.num_dims)
    assert_png(path)
    fig = drawn[-1]
    words = texts(fig)
    assert "original\n" in words and "missing region\n(red)" in words and "inpainted\n(region outlined)" in words
    assert any(f"varying {n_varied} of {model.num_dims} latents" in w and "16 missing pixels" in w for w in words)
    axes = image_axes(fig)
    assert len(axes) == 6
    shown = torch.as_tensor(axes[1].images[0].get_array().data)  # image 0 with the region red
    assert (shown[mask] == torch.tensor([1.0, 0.0, 0.0])).all()
    torch.testing.assert_close(shown[~mask], to_pixels(x[0].float()).permute(1, 2, 0)[~mask])
    with pytest.raises(ValueError, match="mask must be"):
        figures.inpaint_figure(x, mask[:8], result, tmp_path / "bad.png")


@pytest.mark.parametrize("level", [1, 0])
def test_correlation_figure(seed, tmp_path, drawn, level):
    model = small_model(C=2)
    x = logit_transform(torch.rand(40, 2, 16, 16))[0].double()
    result = analysis.latent_correlation(model, x, level)
    path = figures.correlation_figure(result, tmp_path / f"corr{level}.png")
    assert_png(path, min_side=300)
    fig = drawn[-1]
    words = texts(fig)
    D = len(result.latents)
    assert any(f"Correlation of the {D} latents at RG level {level}" in w for w in words)
    assert "Pearson correlation over the images" in words
    off = result.matrix[~torch.eye(D, dtype=torch.bool)]
    assert any(f"mean |off-diagonal| {float(off.abs().mean()):.3f}" in w and "over 40 images" in w for w in words)
    heatmap = image_axes(fig)[0]
    torch.testing.assert_close(torch.as_tensor(heatmap.images[0].get_array().data), result.matrix)
    labels = [t.get_text() for t in heatmap.get_xticklabels()]
    c, i, j = result.latents[0]
    assert labels[0] == f"c{c} ({i},{j})"
    if D <= 48:
        assert labels == [f"c{c} ({i},{j})" for c, i, j in result.latents]
    else:
        assert "a label every" in heatmap.get_xlabel()
    # a bare matrix needs its latents named
    with pytest.raises(ValueError, match="latents must name"):
        figures.correlation_figure(result.matrix, tmp_path / "bad.png")
    figures.correlation_figure(result.matrix, tmp_path / "bare.png", latents=result.latents)
    assert_png(tmp_path / "bare.png", min_side=300)


def test_figures_leave_matplotlib_s_backend_alone(tmp_path):
    backend = matplotlib.get_backend()
    model = small_model(C=1)
    figures.mix_figure(torch.cat([model.sample(1)] * 3), tmp_path / "m.png")
    assert matplotlib.get_backend() == backend
