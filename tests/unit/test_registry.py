from __future__ import annotations

from dataclasses import dataclass

import pytest

from lightning_distill import LOSSES, UserError
from lightning_distill.config.registry import REGISTRIES, Registry

ROLES = {"teacher", "student", "adapter", "backbone", "head", "discriminator", "loss", "schedule", "data", "codec",
         "optimizer", "callback", "method"}


def test_one_registry_per_role_with_a_contract():
    assert ROLES <= set(REGISTRIES)
    for role, registry in REGISTRIES.items():
        assert registry.role == role
        assert registry.__doc__ and len(registry.__doc__) > 40, role


def test_duplicate_name_raises_unless_override():
    reg = Registry("thing", "test registry")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(ValueError, match="already registered"):

        @reg.register("a")
        class B:
            pass

    @reg.register("a", override=True)
    class C:
        pass

    assert reg.get("a") is C


def test_unknown_name_lists_registered_and_closest():
    with pytest.raises(UserError) as err:
        LOSSES.get("ns_gam")
    message = str(err.value)
    assert "Did you mean 'ns_gan'?" in message
    assert "mse" in message and "ns_gan" in message


def test_plugin_package_registers_through_its_entry_point():
    """The example package in plugins/ is installed; its components arrive with no import from our side."""
    from importlib.metadata import entry_points

    from lightning_distill.config.registry import HEADS, loaded_plugins

    names = [ep.name for ep in entry_points(group="lightning_distill.plugins")]
    assert "extras" in names, "pip install ./plugins/lightning-distill-extras"
    assert "ns_gan_smooth" in LOSSES and "patch" in HEADS
    assert LOSSES.get("ns_gan_smooth").__module__ == "lightning_distill_extras"
    assert any(p.startswith("extras") for p in loaded_plugins)


def test_plugin_components_train_through_the_cli(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "recipes/debug.yaml", "--out", str(out), "method.adversarial_loss.name=ns_gan_smooth",
                 "method.discriminator.head.name=patch", "schedule.stages.0.phases.0.steps=1",
                 "schedule.stages.1.phases.0.steps=2", "schedule.stages.1.phases.1.steps=1")
    assert result.returncode == 0, result.stderr
    assert "loaded lightning-distill plugin extras" in result.stderr
    assert (out / "phases" / "02-s4-uncond.safetensors").is_file()


def test_components_command_lists_fields_and_plugins(cli):
    result = cli("components", "loss")
    assert result.returncode == 0, result.stderr
    assert "ns_gan_smooth" in result.stdout and "real_label: float = 0.9" in result.stdout
    assert "rpgan" in result.stdout and "lsgan" in result.stdout
    plugins = next(line for line in result.stdout.splitlines() if line.startswith("plugins: "))
    assert "extras (lightning_distill_extras)" in plugins


def _l1_loss_module(name: str) -> str:
    """Source of an unpackaged module that registers an L1 regression loss as ``name``."""
    return (
        "from dataclasses import dataclass\n"
        "import torch.nn.functional as F\n"
        "from lightning_distill import LOSSES\n"
        "@LOSSES.register('" + name + "')\n"
        "class L1:\n"
        "    adversarial = False\n"
        "    @dataclass(kw_only=True)\n"
        "    class Config:\n"
        "        scale: float = 1.0\n"
        "    def __init__(self, config): self.config = config\n"
        "    def __call__(self, pred, target): return self.config.scale * F.l1_loss(pred, target)\n"
    )


def test_recipe_imports_register_unpackaged_components(tmp_path, monkeypatch):
    module = tmp_path / "my_components.py"
    module.write_text(_l1_loss_module("l1_local"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from support import DEBUG_RECIPE

    from lightning_distill.config.recipe import load_recipe

    loaded = load_recipe(DEBUG_RECIPE, ["imports=[my_components]", "method.regression_loss.name=l1_local",
                                       "method.regression_loss.scale=2.0"])
    spec = loaded.recipe.method.config.regression_loss
    assert spec.name == "l1_local" and spec.config.scale == 2.0
    assert loaded.resolved["imports"] == ["my_components"]


def test_imports_beside_the_recipe_are_found_and_recorded_so_a_run_needs_no_pythonpath(tmp_path, cli):
    """A module (or a .py file) beside the recipe is imported without PYTHONPATH; the run's recipe.yaml records
    its absolute path, so commands on the run (here ``validate`` of the run's recipe and ``components --recipe``)
    find it from another folder."""
    from support import DEBUG_RECIPE

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "beside_loss.py").write_text(_l1_loss_module("l1_beside"))
    (folder / "recipe.yaml").write_text(f"extends: {DEBUG_RECIPE}\nimports: [beside_loss]\n"
                                        "method: {regression_loss: {name: l1_beside}}\n")
    (folder / "by_file.yaml").write_text(f"extends: {DEBUG_RECIPE}\nimports: [./beside_loss.py]\n"
                                         "method: {regression_loss: {name: l1_beside}}\n")
    from lightning_distill.config.recipe import load_recipe

    for recipe in ("recipe.yaml", "by_file.yaml"):
        loaded = load_recipe(folder / recipe)
        assert loaded.resolved["imports"] == [str((folder / "beside_loss.py").resolve())]
        assert loaded.recipe.method.config.regression_loss.name == "l1_beside"
    copy = tmp_path / "elsewhere" / "recipe.yaml"  # as a run folder keeps it
    copy.parent.mkdir()
    copy.write_text(f"extends: {DEBUG_RECIPE}\nimports: [{folder / 'beside_loss.py'}]\n"
                    "method: {regression_loss: {name: l1_beside}}\n")
    assert cli("validate", str(copy)).returncode == 0
    listed = cli("components", "loss", "--recipe", str(folder / "recipe.yaml"))
    assert listed.returncode == 0 and "l1_beside" in listed.stdout, listed.stderr[-2000:]
    assert "l1_beside" not in cli("components", "loss").stdout
    missing = cli("validate", str(DEBUG_RECIPE), "imports=[./no_such_file.py]")
    assert missing.returncode == 2 and "no_such_file.py" in missing.stderr


def test_config_of_a_registered_component_is_typed():
    @dataclass(kw_only=True)
    class Cfg:
        x: int = 1

    reg = Registry("thing2", "test registry")

    @reg.register("k")
    class K:
        Config = Cfg

    assert reg.get("k").Config is Cfg
