"""The method registry and protocol (methods/registry.py, methods/base.py): names, params blocks, device placement."""

from __future__ import annotations

import pytest
import torch

from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.methods import registry
from d2dprompt.methods.base import Method, place, tensors_of
from d2dprompt.params import params_from_dict

# what train writes into model.json beyond the params blocks, for the methods that learn per category or on latents
RECORDS = {"draem": {"categories": ["sample/tile", "sample/weave"]}, "patchknn": {"categories": ["sample/tile"], "memory_shapes": {"sample/tile": [32, 36]}}, "decodiff": {"categories": ["sample/tile"], "latent_shape": [4, 16, 16]}}


@pytest.mark.parametrize("name", [m.name for m in registry.BUILT_IN])
def test_placement_moves_every_tensor_a_method_computes_with(name):
    """`Module.to` misses frozen backbones kept as plain attributes (AnomalyCLIP's CLIP, the SD of D2D-Prompt and
    D2D, DeCo-Diff's VAE): training AnomalyCLIP on a GPU mixed devices that way. Every method's `place` moves them."""
    method = registry.get(name)
    model = method.build(params_from_dict({"methods": [name]}), RECORDS.get(name, {}))
    on_cpu = tensors_of(model)
    assert on_cpu and all(t.device.type == "cpu" for t in on_cpu.values())
    method.place(model, "meta")
    left = sorted(path for path, t in tensors_of(model).items() if t.device.type != "meta")
    assert not left, left[:5]
    assert len(tensors_of(model)) == len(on_cpu)


def test_module_to_alone_leaves_a_plain_attribute_backbone_behind():
    """What the placement test guards against, shown on AnomalyCLIP: the bug `place` fixes."""
    method = registry.get("anomalyclip")
    model = method.build(params_from_dict({"methods": ["anomalyclip"]}), {})
    model.to("meta")
    assert any(t.device.type == "cpu" for t in tensors_of(model).values())  # the CLIP stayed
    place(model, "meta")
    assert all(t.device.type == "meta" for t in tensors_of(model).values())


def test_every_built_in_method_has_its_block_and_unknown_names_are_refused():
    params = params_from_dict({})
    for method in registry.BUILT_IN:
        if method.params is not None:
            assert isinstance(getattr(params, method.name), method.params)
    with pytest.raises(ParamsError, match=r"^methods: 'patchcore' is not a registered method; choose from d2dprompt \| d2d \| anomalyclip"):
        params_from_dict({"methods": ["d2dprompt", "patchcore"]})
    too_deep = {"decodiff": {"channels": [8] * 6}}  # halves the 32x32 latents of the default 128 px 5 times
    params_from_dict(too_deep)  # a method's own check applies only when `methods` lists it
    with pytest.raises(ParamsError, match=r"^decodiff\.channels: 6 levels halve the 32x32 latents"):
        params_from_dict({"methods": ["decodiff"], **too_deep})


def test_a_registered_method_brings_its_params_block():
    from pydantic import Field

    from d2dprompt.core.runtime.config import Block

    class KnnParams(Block):
        k: int = Field(1, ge=1)

    class Knn(Method):
        name = "knn_test"
        params = KnnParams
        reads = "latents"

    with pytest.raises(ParamsError, match=r"^knn_test: unknown block"):
        params_from_dict({"knn_test": {"k": 3}})
    registry.register(Knn())
    try:
        assert params_from_dict({"methods": ["knn_test"], "knn_test": {"k": 3}}).knn_test.k == 3
        with pytest.raises(ParamsError, match=r"^knn_test\.k: must be >= 1, got 0"):
            params_from_dict({"knn_test": {"k": 0}})
        with pytest.raises(ValueError, match="registered already"):
            registry.register(type("Knn", (Method,), {"name": "knn_test", "reads": "latents"})())
        with pytest.raises(ValueError, match="a params block of the pipeline has this name"):
            registry.register(type("Evaluate", (Method,), {"name": "evaluate", "reads": "latents"})())
    finally:
        registry.unregister("knn_test")
    with pytest.raises(ParamsError, match=r"^methods: 'knn_test' is not a registered method"):
        params_from_dict({"methods": ["knn_test"]})
    with pytest.raises(ValueError, match="a built-in method stays registered"):
        registry.unregister("draem")


def test_an_unknown_method_in_a_trained_folder_is_named(tmp_path):
    import json

    from d2dprompt.trained import read_record

    (tmp_path / "model.json").write_text(json.dumps({"method": "patchcore"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ParamsError, match=rf"^{tmp_path / 'model.json'}: unknown method 'patchcore'; registered: d2dprompt"):
        read_record(tmp_path)


def test_maps_of_every_method_lie_on_the_unit_scale_the_fixed_threshold_assumes():
    """evaluate.threshold: fixed applies evaluate.sensitivity in [0, 1] to every method's map (AnomalyCLIP's map was
    a sum over feature layers, in [0, L])."""
    from d2dprompt.methods.anomalyclip.model import anomaly_map

    layers = [torch.rand(2, 2, 7, 7).softmax(1) for _ in range(4)]
    amap = anomaly_map(layers, (28, 28))
    assert amap.min() >= 0 and amap.max() <= 1
    assert torch.equal(torch.argsort(amap.flatten()), torch.argsort(sum((m[:, 1] + 1 - m[:, 0]) / 2 for m in [torch.nn.functional.interpolate(s, size=(28, 28), mode="bilinear") for s in layers]).flatten()))


def test_a_run_with_a_model_per_category_names_the_categories_it_knows():
    from d2dprompt.methods.base import category_index

    record = {"categories": ["sample/disc", "sample/tile"]}
    assert category_index(record, "sample/tile", "draem") == 1
    assert category_index({"categories": ["sample/disc"]}, None, "draem") == 0  # the one category of a one-category run
    with pytest.raises(ValueError, match=r"^draem knows its categories: choose --category from sample/disc \| sample/tile$"):
        category_index(record, None, "draem")
    with pytest.raises(ValueError, match=r"^sample/foo: no draem model was trained for this category \(sample/disc \| sample/tile\); rerun train@draem$"):
        category_index(record, "sample/foo", "draem")
