"""Drawing the captured graph (``ex.draw``), plotting patching grids and feature maps, ``fxstore draw``.

References: torchvision's own node names and its feature extractor (which nodes a cut keeps),
forward hooks (the shapes of stored values), the model's module tree, numpy (the plotted pixels).
"""

import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torchvision
from _hooks import hooked_outputs
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import fxstore
from fxstore import ConfigError, FeatureExtractor
from fxstore.cli import main
from fxstore.draw import STYLES

_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s\]]+)')
_NODE = re.compile(r'^\t+("(?:[^"\\]|\\.)*"|[\w.]+) \[(.*)\]$')


def node_statements(source: str) -> list[tuple[str, dict[str, str]]]:
    """Every node statement of a DOT source (not edges, not the legend): ``(id, attributes)``."""
    found = []
    for line in source.splitlines():
        match = _NODE.match(line)
        if match and "->" not in line and match.group(1) not in ("graph", "node", "edge"):
            name = match.group(1).strip('"')
            attributes = {k: v.strip('"') for k, v in _ATTR.findall(match.group(2))}
            if not name.startswith("legend "):
                found.append((name, attributes))
    return found


def has_style(attributes: dict[str, str], mark: str) -> bool:
    """The node carries every attribute of ``mark`` (a stored+edited fill is the two colours striped)."""
    for key, value in STYLES[mark].items():
        if key == "fillcolor" and attributes.get("style") == "striped":
            if value not in attributes.get("fillcolor", "").split(":"):
                return False
        elif key == "style":
            have = set(attributes.get("style", "").split(","))
            if not set(value.split(",")) <= have | ({"filled"} if "striped" in have else set()):
                return False
        elif attributes.get(key) != value:
            return False
    return True


def kept_by_torchvision(model: torch.nn.Module, node: str) -> set[str]:
    """The nodes (by torchvision name) that torchvision's own extractor for ``node`` keeps."""
    tracer = NodePathTracer()
    qualname = {n.name: tracer.node_to_qualname[n] for n in tracer.trace(model).nodes if n in tracer.node_to_qualname}
    return {qualname[n.name] for n in create_feature_extractor(model, [node]).graph.nodes if n.name in qualname}


def last_node_of(names: list[str], module: str) -> str:
    """torchvision's name of a module's output: the last node traced inside it."""
    return [n for n in names if n == module or n.startswith(module + ".")][-1]


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64)
    ex = FeatureExtractor(model, ["conv1", "layer2"], grads=["layer1"], keep_output=False,
                          edits={"layer1.0": fxstore.Scale(0.5), "layer2": fxstore.Add(torch.zeros(128, 1, 1))})
    return model, x, ex


def test_resnet_marks_each_stored_tapped_edited_and_pruned_node_once_with_its_style(resnet):
    model, x, ex = resnet
    names = get_graph_node_names(model)[1]
    stored = {"conv1": "conv1", last_node_of(names, "layer2"): "layer2"}
    tapped = {last_node_of(names, "layer1"): "layer1:grad"}
    edited = {last_node_of(names, "layer1.0"): "Scale", last_node_of(names, "layer2"): "Add"}
    kept = kept_by_torchvision(model, last_node_of(names, "layer2"))
    pruned = (set(names) - kept) | {"output"}  # torchvision's cut; the model's output node goes with keep_output

    with torch.no_grad():
        _, features = ex(x)
    statements = node_statements(ex.draw(features=features).source)
    ids = [name for name, _ in statements]
    assert sorted(ids) == sorted(set(names) | {"output"})  # every node once (no get_attr in a resnet)
    attributes = dict(statements)
    for name, key in stored.items():
        assert has_style(attributes[name], "stored") and f"stored: {key}" in attributes[name]["label"]
    for name, key in tapped.items():
        assert has_style(attributes[name], "tapped") and f"grad: {key}" in attributes[name]["label"]
    for name, kind in edited.items():
        assert has_style(attributes[name], "edited") and f"edit: {kind}" in attributes[name]["label"]
    assert {n for n, a in statements if has_style(a, "pruned")} == pruned
    assert {n for n, a in statements if has_style(a, "stored")} == set(stored)
    assert {n for n, a in statements if has_style(a, "tapped")} == set(tapped)
    assert {n for n, a in statements if has_style(a, "edited")} == set(edited)
    reference = hooked_outputs(model, ["layer2"], x)[1]["layer2"][0]
    assert "(" + ", ".join(map(str, reference.shape)) + ")" in attributes[last_node_of(names, "layer2")]["label"]


def test_vit_marks_its_selected_nodes_and_prunes_every_block_past_the_cut():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64).eval()
    names = get_graph_node_names(model)[1]
    ex = FeatureExtractor(model, ["encoder.layers.encoder_layer_1"], grads=["conv_proj"], keep_output=False,
                          edits={"encoder.layers.encoder_layer_0.mlp": fxstore.Scale(2.0)})
    statements = dict(node_statements(ex.draw().source))
    expected = {last_node_of(names, "encoder.layers.encoder_layer_1"): "stored", "conv_proj": "tapped",
                last_node_of(names, "encoder.layers.encoder_layer_0.mlp"): "edited"}
    for mark in ("stored", "tapped", "edited"):
        assert {n for n, a in statements.items() if has_style(a, mark)} == {n for n, m in expected.items() if m == mark}
    # each block first asserts its input is 3-D: the check of a kept value stays (fxstore keeps assertions on
    # live values), everything the block computes goes
    check = re.compile(r"\.(getattr|dim|eq|_assert)(_\d+)?$")
    after = [n for n in names if n.startswith(("encoder.layers.encoder_layer_2.", "encoder.ln", "heads"))
             and not check.search(n)]
    kept = kept_by_torchvision(model, last_node_of(names, "encoder.layers.encoder_layer_1"))
    before = [n for n in kept if n.startswith(("conv_proj", "encoder.layers.encoder_layer_0."))]
    assert after and all(has_style(statements[n], "pruned") for n in after if n in statements)
    assert before and not any(has_style(statements[n], "pruned") for n in before if n in statements)


def test_depth_collapses_modules_into_boxes_and_keeps_the_selected_nodes(resnet):
    model, _, ex = resnet
    names = get_graph_node_names(model)[1]
    selected = {"conv1", last_node_of(names, "layer1.0"), last_node_of(names, "layer1"), last_node_of(names, "layer2")}
    statements = dict(node_statements(ex.draw(depth=1).source))
    assert selected <= set(statements)
    for module in ("layer1", "layer2", "layer3", "layer4"):
        inside = [n for n in names if n.startswith(module + ".")]
        assert not set(inside) - selected & set(statements)  # only the selected nodes of a module are drawn
        box = statements[f"module {module}" + (" pruned" if module in ("layer3", "layer4") else "")]
        assert f"{len(set(inside) - selected)} ops" in box["label"] and has_style(box, "collapsed")
    assert has_style(statements["module layer3 pruned"], "pruned")
    everything = dict(node_statements(ex.draw(depth=0).source))
    assert set(everything) == selected | {"x", "output", "module <model>", "module <model> pruned"}


def test_export_frontend_draws_a_tiny_gpt2_with_its_marks_and_cut():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 5))
    ex = FeatureExtractor(model, ["transformer.h.0.mlp"], grads=["transformer.h.0.attn"], keep_output=False,
                          frontend="export", example_inputs=((ids,), {}),
                          edits={"transformer.h.0.ln_2": fxstore.Scale(1.0)})
    description = ex.graph_description
    assert description.frontend == "export"
    marked = {n.name: n for n in description.nodes if n.selected}
    assert [n.module for n in marked.values() if n.keys] == ["transformer.h.0.mlp.dropout"]  # the mlp's last op
    assert [n.module for n in marked.values() if n.grad_keys][0].startswith("transformer.h.0.attn")
    assert [n.module for n in marked.values() if n.edit] == ["transformer.h.0.ln_2"]
    modules = {n.module for n in description.nodes if n.module}
    after = [m for m in modules if m.startswith(("transformer.h.1", "transformer.ln_f", "lm_head"))]
    # past the cut, everything is pruned but the parameters the kept part reads too (lm_head's, tied to wte)
    assert after and all(n.pruned for n in description.nodes if n.module in after and n.op != "get_attr")
    assert not any(n.pruned for n in description.nodes if n.module.startswith("transformer.h.0."))
    reference = hooked_outputs(model, ["transformer.h.0.mlp"], ids)[1]["transformer.h.0.mlp"][0]
    stored = next(n for n in marked.values() if n.keys)
    assert stored.shape[0] == reference.shape[0] and stored.shape[2] == reference.shape[2]
    statements = dict(node_statements(ex.draw(depth=3).source))
    for name, node in marked.items():
        assert name in statements
        assert has_style(statements[name], "stored") == bool(node.keys)
        assert has_style(statements[name], "tapped") == bool(node.grad_keys)
    assert has_style(statements["module transformer.h.1 pruned"], "pruned")
    # depth 2: the ops of GPT2Model's own forward (the attention mask: arange, cumsum, index, ...) are drawn as
    # a few boxes, each counting its run of connected ops; together they count every op not drawn alone
    own = [n for n in description.nodes if n.module == "transformer" and n.op in ("call_function", "call_method")
           and not n.target.startswith(("aten._assert", "aten.sym_"))]
    statements = dict(node_statements(ex.draw(depth=2).source))
    runs = [int(re.search(r": (\d+) ops", a["label"]).group(1)) for n, a in statements.items()
            if n.startswith("ops ") and a["label"].startswith("transformer: ")]
    alone = [n for n in own if n.name in statements]
    assert runs and sum(runs) + len(alone) == len(own) and len(runs) + len(alone) < len(own) / 4


def test_drawing_an_extractor_that_waits_for_its_first_call_says_how_to_build_it():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16)
    ex = FeatureExtractor(transformers.GPT2LMHeadModel(config).eval(), ["transformer.h.0"])
    with pytest.raises(ConfigError, match=r"Hint: pass example_inputs=\(x,\), call the extractor once"):
        ex.draw()


def test_partial_frontend_draws_the_modules_kept_as_python_around_the_traced_parts():
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, min_size=96, max_size=128).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = FeatureExtractor(model, ["backbone.fpn", "rpn.head"], grads=["backbone.body.16"], frontend="partial")
    python = ex.trace_report.python_modules
    source = ex.draw(depth=2).source
    statements = dict(node_statements(source))
    for path in python:
        assert f'subgraph "cluster_python {path}"' in source  # every module kept as Python is a box ...
        if path:  # ... holding its own output (filled as stored, if stored)
            assert statements[path]["shape"] == "component"
            assert has_style(statements[path], "stored" if path == "rpn.head" else "python")
    assert has_style(statements["rpn.head"], "stored") and "stored: rpn.head" in statements["rpn.head"]["label"]
    stored = [n for n in ex.graph_description.nodes if n.keys]
    assert {k for n in stored for k in n.keys} == set(ex.feature_keys)
    assert all(has_style(statements[n.name], "stored") for n in stored)
    assert has_style(statements["backbone.body.16"], "tapped")


def test_svg_png_and_pdf_are_rendered_and_the_source_written(resnet, tmp_path):
    _, _, ex = resnet
    ex.draw(tmp_path / "g.svg", depth=1)
    svg = ET.parse(tmp_path / "g.svg").getroot()
    titles = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")}
    assert {"conv1", "layer2.1.relu_1", "module layer3 pruned"} <= titles
    ex.draw(tmp_path / "g.png", depth=0)
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ex.draw(str(tmp_path / "g.pdf"), depth=0)
    assert (tmp_path / "g.pdf").read_bytes()[:5] == b"%PDF-"
    dot = ex.draw(tmp_path / "g.dot", depth=0)
    assert (tmp_path / "g.dot").read_text() == dot.source


def test_a_missing_dot_binary_raises_with_the_install_hint(resnet, tmp_path, monkeypatch):
    _, _, ex = resnet
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match=r"(?s)'dot'.*Hint: .*apt-get install graphviz"):
        ex.draw(tmp_path / "g.svg")
    assert not (tmp_path / "g.svg").exists()
    assert "digraph" in ex.draw().source  # the graph itself needs no binary


def test_a_missing_graphviz_package_raises_with_the_extra_to_install(resnet, monkeypatch):
    _, _, ex = resnet
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(ConfigError, match=r"Hint: pip install 'fxstore\[plot\]'"):
        ex.draw()


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": -1}, "depth=-1"),
    ({"depth": "1"}, "depth='1'"),
    ({"colour": "red"}, r"unknown options \['colour'\]"),
    ({"direction": "up"}, "direction='up'"),
    ({"features": [1]}, "features dict"),
    ({"path": "g.jpg"}, "suffix '.jpg'"),
])
def test_bad_drawing_options_raise_naming_the_option(resnet, kwargs, message):
    _, _, ex = resnet
    with pytest.raises(ConfigError, match=message):
        ex.draw(**kwargs)


def test_import_fxstore_imports_neither_graphviz_nor_matplotlib():
    code = "import sys, fxstore; print(sorted(m for m in ('graphviz', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- plots -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    clean, corrupted = torch.rand(1, 6, 3), torch.rand(1, 6, 3)
    positions = [1, 3, 4, 5]
    grid = fxstore.patch_sweep(net, clean, corrupted, ["0", "1", "2"], lambda y: y[:, -1, 0] - y[:, -1, 1],
                               positions=positions)
    return grid, positions


def test_plot_patching_shows_the_grid_with_token_labels_and_a_zero_centred_diverging_map(sweep):
    grid, positions = sweep
    tokens = ["<s>", "The", " cat", " sat", " on", " it"]
    figure = fxstore.plot_patching(grid, ["0", "1", "2"], positions=positions, tokens=tokens)
    ax, bar = figure.axes
    image = ax.images[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), grid.numpy().astype(float))
    assert [t.get_text() for t in ax.get_xticklabels()] == [tokens[p] for p in positions]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    limit = float(grid.abs().max())
    assert image.get_clim() == (-limit, limit)
    assert image.get_cmap().name == "RdBu_r" and image.get_cmap()(0.5)[:3] == pytest.approx((0.97, 0.97, 0.97), abs=0.03)
    assert bar.get_ylim() == (-limit, limit)  # the colour bar spans the same symmetric limits


def test_plot_patching_of_whole_values_is_one_column_drawn_into_the_given_axes():
    from matplotlib.figure import Figure

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
    grid = fxstore.patch_sweep(net, torch.rand(1, 3), torch.rand(1, 3), ["0", "1"], lambda y: y[:, 0])
    ax = Figure().add_subplot()
    figure = fxstore.plot_patching(grid, [net[0], "1"], ax=ax)
    assert figure is ax.figure
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), grid.numpy()[:, None].astype(float))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Linear", "1"]


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.zeros(2, 3, 4), ["a", "b"]), {}, r"shape \(2, 3, 4\)"),
    ((torch.zeros(2, 3), ["a"]), {}, "1 layers for a grid of 2 rows"),
    ((torch.zeros(2, 3), ["a", "b"]), {"positions": [0, 1]}, "2 positions for a grid of 3 columns"),
    ((torch.zeros(2, 3), ["a", "b"]), {"positions": [0, 1, 7], "tokens": ["x"] * 5}, r"positions \[7\]"),
    ((["a", "b"], ["a", "b"]), {}, "not numeric"),
])
def test_plot_patching_refuses_what_does_not_fit_the_grid(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fxstore.plot_patching(*args, **kwargs)


def test_plot_features_shows_one_tile_per_channel_with_its_values():
    model = torchvision.models.resnet18().eval()
    x = torch.rand(2, 3, 64, 64)
    _, feats = FeatureExtractor(model, ["layer1"], keep_output=False)(x)
    reference = hooked_outputs(model, ["layer1"], x)[1]["layer1"][0]
    figure = fxstore.plot_features(feats["layer1"][1], channels=[5, 0, 63], columns=2, title="layer1")
    assert len(figure.axes) == 3 and figure.get_suptitle() == "layer1"
    for ax, channel in zip(figure.axes, [5, 0, 63]):
        assert ax.get_title() == str(channel)
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), reference[1, channel].numpy(), rtol=0,
                                   atol=1e-6)
    assert len(fxstore.plot_features(feats["layer1"][:1]).axes) == 64
    assert len(fxstore.plot_features(feats["layer1"][0], channels=5).axes) == 5


@pytest.mark.parametrize("tensor, kwargs, message", [
    (torch.zeros(4, 4), {}, r"shape \(4, 4\)"),
    (torch.zeros(2, 3, 4, 4), {}, r"shape \(2, 3, 4, 4\)"),
    (torch.zeros(3, 4, 4), {"channels": [3]}, r"channels \[3\] are not among the tensor's 3"),
    (torch.zeros(3, 4, 4), {"channels": 0}, "channels=0"),
    (torch.zeros(3, 4, 4), {"columns": 0}, "columns=0"),
])
def test_plot_features_refuses_what_is_not_one_feature_map(tensor, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fxstore.plot_features(tensor, **kwargs)


# -- the command line ----------------------------------------------------------------------------------------------


def test_cli_draw_writes_the_picture_and_says_what_it_marked(tmp_path, capsys):
    out = tmp_path / "graph.svg"
    status = main(["draw", "resnet18", "--layers", "layer2", "--grads", "layer1", "--features-only", "--depth", "1",
                   "--image-size", "64", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    names = get_graph_node_names(torchvision.models.resnet18())[1]
    kept = kept_by_torchvision(torchvision.models.resnet18(), last_node_of(names, "layer2"))
    pruned = len(set(names) - kept) + 1  # and the model's output
    assert printed.strip() == f"wrote {out}: fx frontend, 1 stored, 1 tapped, {pruned} pruned nodes"
    titles = {t.text for t in ET.parse(out).getroot().iter("{http://www.w3.org/2000/svg}title")}
    assert {last_node_of(names, "layer2"), last_node_of(names, "layer1"), "module layer4 pruned"} <= titles


def test_cli_draw_refuses_an_unknown_picture_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["draw", "resnet18", "--layers", "layer2", "--out", str(tmp_path / "g.jpg")])
    assert exit_info.value.code == 2
    assert "does not end in .svg, .png, .pdf" in capsys.readouterr().err
