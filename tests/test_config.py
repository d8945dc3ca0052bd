import pytest

from d2dprompt.core.runtime.config import ParamsError, flatten
from d2dprompt.params import Params, load_params, params_from_dict
from tests.conftest import ROOT


def test_repository_params_file_loads():
    params = load_params(ROOT / "params.yaml")
    assert params.model.pretrained == "tiny"
    assert params.evaluate.datasets == ["sample"]


def test_missing_keys_take_defaults():
    params = params_from_dict({"loss": {"sharpness": 0.3}})
    assert params.loss.sharpness == 0.3
    assert params.loss.focal == Params().loss.focal


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("loss:\n  sharpnes: 0.3\n")
    with pytest.raises(ParamsError, match=r"params.yaml: loss.sharpnes: unknown key \(did you mean 'sharpness'\?\); loss takes focal, "):
        load_params(path)


def test_unknown_block_is_named():
    with pytest.raises(ParamsError, match="^trian: unknown block"):
        params_from_dict({"trian": {}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match="^train.epochs: must be a whole number, got 'many'"):
        params_from_dict({"train": {"epochs": "many"}})
    with pytest.raises(ParamsError, match="^attention.levels: must be a list"):
        params_from_dict({"attention": {"levels": 1}})


def test_ints_widen_to_floats_but_bools_are_not_numbers():
    assert params_from_dict({"loss": {"dice": 2}}).loss.dice == 2.0
    with pytest.raises(ParamsError, match="^train.epochs: must be a whole number, got True"):
        params_from_dict({"train": {"epochs": True}})


def test_flatten_names_every_key():
    flat = flatten(Params())
    assert flat["loss.sharpness"] == 0.0
    assert flat["prompt.n_ctx"] == 12
    assert flat["methods"] == ["d2dprompt"]  # the one top-level list, as `dvc exp show` names it
    assert all("." in key for key in flat if key != "methods")


def test_defaults_pass_their_own_checks():
    """Every default obeys its range and the cross-block checks (pydantic does not re-check defaults)."""
    defaults = params_from_dict({})
    assert params_from_dict(defaults.model_dump()) == defaults


def test_one_dvc_set_param_changes_one_line_of_params_yaml(tmp_path):
    """params.yaml is written in the style DVC writes back, so `dvc exp run -S key=value` leaves a one-line diff."""
    from dvc.utils.hydra import apply_overrides

    original = (ROOT / "params.yaml").read_text()
    changed = tmp_path / "params.yaml"
    changed.write_text(original)
    apply_overrides(str(changed), ["loss.sharpness=0.3"])
    before, after = original.splitlines(), changed.read_text().splitlines()
    assert len(before) == len(after)
    assert [(a, b) for a, b in zip(before, after) if a != b] == [("  sharpness: 0.0", "  sharpness: 0.3")]
    apply_overrides(str(changed), ["+download.folders.bottles=/data/bottles", "~download.folders.sample", "train.datasets=[bottles]", "evaluate.datasets=[bottles]"])
    assert load_params(changed).download.folders == {"bottles": "/data/bottles"}  # DVC's add / remove forms keep it valid
