"""Every recipe is a valid Config whose model resolves, and the SSS specs are the published networks."""
from pathlib import Path

import pytest

from prunekit import spec as S
from prunekit.config import load_recipe, make_config
from prunekit.measure import spec_cost
from prunekit.models import zoo_spec
from prunekit.protocols import scratch_b_schedule
from prunekit.runner import model_spec

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SSS_UNITS = {41: [(0, False), (4, True), (6, True), (3, True)],
             32: [(1, False), (4, True), (4, True), (1, True)],
             26: [(0, False), (2, False), (5, False), (1, True)]}


def test_there_is_a_recipe_per_experiment():
    names = {path.stem for path in RECIPES}
    assert len(names) == 33
    assert {f"fmnist-{m}" for m in ("sss", "binary-gate", "ista-bn", "slimming", "epsilon-resnet", "none")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_is_a_valid_config_with_a_model_that_resolves(path, monkeypatch):
    config = make_config(load_recipe(path), str(path))
    monkeypatch.chdir(ROOT)
    model_spec(config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ")
    assert f"prunekit train --recipe recipes/{path.name} --out runs/{path.stem}" in path.read_text()


@pytest.mark.parametrize("depth", sorted(SSS_UNITS))
def test_sss_spec_is_the_authors_preactivation_resnet50_with_the_published_units(depth):
    spec = S.load(ROOT / "recipes" / "specs" / f"resnet{depth}.json")
    assert S.count_layers(spec) == depth
    assert spec == S.apply_units(zoo_spec("imagenet-preresnet50", num_classes=1000), SSS_UNITS[depth])


@pytest.mark.parametrize("depth", sorted(SSS_UNITS))
def test_sss_scratch_recipes_use_the_scratch_budgets(depth):
    base = zoo_spec("imagenet-preresnet50", num_classes=1000)
    pruned = S.load(ROOT / "recipes" / "specs" / f"resnet{depth}.json")
    ratio = spec_cost(base, (224, 224)).macs / spec_cost(pruned, (224, 224)).macs
    recipes = {budget: make_config(load_recipe(ROOT / "recipes" / f"sss-resnet{depth}-scratch-{budget}-imagenet.yaml"))
               for budget in ("e", "b")}
    assert (recipes["e"].epochs, recipes["e"].milestones) == (100, [30, 60, 90])
    assert (recipes["b"].epochs, recipes["b"].milestones) == scratch_b_schedule(100, [30, 60, 90], ratio)
    for config in recipes.values():
        assert (config.model, config.method, config.schedule) == (f"recipes/specs/resnet{depth}.json", "none", "step")


def test_every_recipe_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [path.name for path in RECIPES if f"`{path.name}`" not in readme] == []
