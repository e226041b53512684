"""engine.config.Config, the one base of the recipe's configs: unknown keys (with the closest known one),
old key names accepted by from_dict only, to_dict / from_dict round trips."""

import json

import pytest

from lotus_kernels.recipe.engine import TrainConfig
from lotus_kernels.recipe.engine.config import Config, check_keys
from lotus_kernels.recipe.method import InstantSoupConfig
from lotus_kernels.recipe.pipeline import PipelineConfig


def test_unknown_keys_name_every_one_and_the_closest_known_key():
    with pytest.raises(ValueError, match=r"unknown config keys: bogus, epoch; did you mean 'epoch' -> 'epochs'\? \(known: model, "):
        TrainConfig.from_dict({"bogus": 1, "epoch": 3})
    with pytest.raises(ValueError, match=r"unknown pipeline config keys: keep_ration; did you mean 'keep_ration' -> 'keep_ratio'\?"):
        PipelineConfig.from_dict({"keep_ration": 0.5})
    with pytest.raises(ValueError, match=r"unknown InstantSoupConfig keys: zzz \(known: "):
        InstantSoupConfig.from_dict({"zzz": 1})
    check_keys({"a": 1}, ("a", "b"), "thing")  # nothing unknown: no error


@pytest.mark.parametrize("cls", [TrainConfig, PipelineConfig, InstantSoupConfig])
def test_every_recipe_config_is_a_config_and_round_trips_through_json(cls):
    config = cls()
    assert isinstance(config, Config)
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TypeError, match=f"d must be a mapping of {cls.CONFIG_NAME} keys"):
        cls.from_dict([("a", 1)])


def test_old_isp_spellings_load_through_from_dict_only():
    old = PipelineConfig.from_dict({"isp_ingredients": 3, "isp_subset_fraction": 0.2, "isp_prune_step": 0.2,
                                    "isp_vote_threshold": 2, "isp_ingredient_epochs": 2})
    assert (old.ingredients, old.subset_fraction, old.prune_step, old.vote_threshold, old.ingredient_epochs) == (3, 0.2, 0.2, 2, 2)
    assert "isp_ingredients" not in old.to_dict() and old.to_dict()["ingredients"] == 3
    assert InstantSoupConfig.from_dict({"num_ingredients": 3, "vote_threshold": 3}).ingredients == 3
    with pytest.raises(ValueError, match="'isp_ingredients' is the old name of 'ingredients': give one of them, not both"):
        PipelineConfig.from_dict({"isp_ingredients": 3, "ingredients": 3})
    with pytest.raises(TypeError):
        InstantSoupConfig(num_ingredients=3)  # the constructor takes the one current spelling


def test_the_pipeline_stage_settings_are_the_prune_commands():
    # One spelling of the Instant Soup settings: the pipeline's stage is built from the same names prune_checkpoint takes.
    config = PipelineConfig(ingredients=3, subset_fraction=0.2, prune_step=0.2, vote_threshold=2, ingredient_epochs=2, isp_lr=1e-3)
    stage = config.instant_soup
    assert (stage.ingredients, stage.subset_fraction, stage.prune_step, stage.vote_threshold, stage.ingredient_epochs, stage.isp_lr) == (
        3, 0.2, 0.2, 2, 2, 1e-3)
    assert stage.isp_config(seed=7).to_dict()["ingredients"] == 3 and stage.isp_config(seed=7).finetune is False
