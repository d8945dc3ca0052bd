"""methods/graph.py and each method's export_graph on the tiny model: the traced ONNX graph computes the method's own
encode + scorer, at any batch size, and what has no graph says why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2dprompt.core.runtime.config import AttentionParams, EvaluateParams, LossParams, ModelParams, PromptParams
from d2dprompt.export import check_images, export_graph_file
from d2dprompt.methods import registry
from d2dprompt.methods.base import Scoring
from d2dprompt.methods.d2dprompt.model import build_segmenter
from d2dprompt.methods.graph import NotExportable
from d2dprompt.serve.onnx_backend import INPUT, OUTPUTS, OnnxGraphs, to_pixels

SIDE = 64  # the tiny VAE reads any multiple of 4; small keeps the trace quick


@pytest.fixture(scope="module")
def prompt_graph_file(tiny, tmp_path_factory):
    torch.manual_seed(0)
    segmenter = build_segmenter(tiny, PromptParams(), AttentionParams(), ModelParams(image_size=SIDE)).eval()
    record = {"method": "d2dprompt", "model": {"noise_seed": 0, "image_size": SIDE}, "fewshot": {}}
    scoring = Scoring.of(EvaluateParams(map_size=SIDE), LossParams(), ModelParams(precision="fp32"))
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    export_graph_file(registry.get("d2dprompt").export_graph(segmenter, record, scoring, None), SIDE, path)
    return segmenter, record, scoring, path


@pytest.mark.parametrize("batch", [1, 4])
def test_the_d2dprompt_graph_gives_the_scorers_maps_at_any_batch_size(prompt_graph_file, batch):
    segmenter, record, scoring, path = prompt_graph_file
    method = registry.get("d2dprompt")
    images = check_images(batch, SIDE, seed=7)
    expected_maps, expected_scores = method.scorer(segmenter, record, scoring, torch.device("cpu"))(
        method.encode(segmenter, images, torch.device("cpu")), [None] * batch)
    maps, scores = OnnxGraphs.session_for(path).run(list(OUTPUTS), {INPUT: to_pixels(images)})
    assert maps.shape == (batch, SIDE, SIDE) and scores.shape == (batch,)
    assert np.abs(maps - expected_maps.numpy()).max() <= 1e-4
    assert np.abs(scores - expected_scores.numpy()).max() <= 1e-4


def test_the_graph_holds_the_prompt_states_not_the_text_encoder(prompt_graph_file):
    """Every weight a graph carries (initializers and constant nodes) adds up to less than the VAE and UNet hold: the
    text encoder's weights are not in it, its output (the states, a constant of their own) is."""
    import onnx
    from onnx import numpy_helper

    segmenter, _, _, path = prompt_graph_file
    graph = onnx.load(str(path)).graph
    tensors = [numpy_helper.to_array(t) for t in graph.initializer]
    tensors += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    carried = sum(t.size for t in tensors)
    sd = segmenter.sd
    vae_unet = sum(p.numel() for m in (sd.vae.encoder, sd.vae.quant_conv, sd.unet) if m is not None for p in m.parameters())
    text = sum(p.numel() for p in sd.text_encoder.parameters())
    states = segmenter.prompt_states().detach().numpy()
    assert carried < vae_unet + states.size + text / 2, (carried, vae_unet, text)
    assert any(t.shape == states.shape and np.allclose(t, states) for t in tensors)


def test_the_graph_input_matches_the_scorers_pixels_bit_for_bit():
    from d2dprompt.core.data.row_images import to_unit

    images = check_images(3, 16, seed=3)
    assert np.array_equal(to_pixels(images), to_unit(images).numpy())


@pytest.mark.parametrize("name", ["d2dprompt", "patchknn"])
def test_a_run_scoring_images_against_each_other_has_no_graph(name):
    with pytest.raises(NotExportable, match=r"fewshot.mutual: true"):
        registry.get(name).export_graph(None, {"method": name, "fewshot": {"mutual": True}}, None, None)


def test_a_traced_nearest_neighbour_search_scores_every_row_of_a_larger_batch(tmp_path):
    """The chunked search loops as often as the trace's batch needed; a graph must cover any batch (it once scored
    only the rows of the traced batch size)."""
    from torch import nn

    from d2dprompt.methods.patch_memory import nearest_distances

    memory = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))

    class Search(nn.Module):
        def forward(self, queries):
            return nearest_distances(queries, memory, query_chunk=4)

    path = tmp_path / "search.onnx"
    torch.onnx.export(Search(), (torch.randn(6, 8),), str(path), dynamo=False, input_names=[INPUT], output_names=["d"],
                      dynamic_axes={INPUT: {0: "n"}, "d": {0: "n"}})
    queries = torch.randn(13, 8, generator=torch.Generator().manual_seed(1))
    (found,) = OnnxGraphs.session_for(path).run(["d"], {INPUT: queries.numpy()})
    assert np.abs(found - nearest_distances(queries, memory).numpy()).max() <= 1e-5


def test_export_refuses_a_flipped_decision_away_from_the_threshold_and_counts_the_rest():
    from d2dprompt.export import parity

    torch_scores = np.array([0.5, 0.50000003, 0.9, 0.1], np.float32)
    onnx_scores = np.array([0.5, 0.49999997, 0.3, 0.1], np.float32)  # a hair's flip at the threshold, a real one at 0.9
    maps = np.zeros((4, 2, 2), np.float32)
    found = parity(maps, torch_scores, maps, onnx_scores, 0.5, 1e-4)
    assert (found["decision_flips"], found["flips_away_from_threshold"], found["near_threshold"]) == (2, 1, 2)
