from __future__ import annotations

import re
from pathlib import Path

import pytest

from support import ROOT
from lightning_distill.config.recipe import dump_recipe, load_recipe
from lightning_distill.errors import RecipeError, UserError

ALL = sorted((ROOT / "recipes").rglob("*.yaml"))
RECIPES = [p for p in ALL if not p.name.startswith("_")]  # a leading underscore marks a base to extend
BASES = [p for p in ALL if p.name.startswith("_")]


def test_recipes_are_shipped():
    assert RECIPES, "no recipes under recipes/"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path):
    loaded = load_recipe(path)
    assert loaded.recipe.schedule.build().phases(), "a recipe must have at least one phase"
    # the resolved tree is itself a valid recipe: it is what the run folder keeps and resumes with
    again = path.parent / f".resolved-{path.name}"
    try:
        again.write_text(dump_recipe(loaded.resolved))
        assert load_recipe(again).resolved == loaded.resolved
    finally:
        again.unlink(missing_ok=True)


def test_every_base_is_extended_by_a_shipped_recipe():
    texts = {p: p.read_text() for p in RECIPES}
    for base in BASES:
        named = re.compile(rf"^extends:.*(^|[\[ ,]){re.escape(base.name)}", re.M)  # alone or in a list
        assert any(named.search(t) for p, t in texts.items() if p.parent == base.parent), base


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "recipes" / "debug.yaml").read_text())
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {batch_size: 2}\ncallbacks: [{name: progress}]\n")
    loaded = load_recipe(child)
    assert loaded.recipe.train.batch_size == 2
    assert loaded.recipe.train.log_every == 2  # kept from the base
    assert [c.name for c in loaded.recipe.callbacks] == ["progress"]


def test_dotlist_overrides_reach_nested_lists_and_types():
    loaded = load_recipe(ROOT / "recipes" / "debug.yaml", [
        "train.batch_size=8", "schedule.stages.1.phases.0.lr=1e-6", "schedule.stages[0].phases[0].steps=3",
        "method.discriminator.head.channels=8",
    ])
    r = loaded.recipe
    assert r.train.batch_size == 8
    phases = r.schedule.build().phases()
    assert phases[0].steps == 3 and phases[1].start == 3
    assert phases[1].optimizers["student"].lr == pytest.approx(1e-6)
    assert r.method.config.discriminator.config.head.config.channels == 8


def test_overrides_address_named_list_items_by_name():
    """``schedule.stages.s4.phases.0.lr`` is ``schedule.stages.1.phases.0.lr`` (the stage named s4); a name that is
    not there, or there twice, is a clear error, and a bad value under a named item is the command line's."""
    by_index = load_recipe(ROOT / "recipes" / "debug.yaml", ["schedule.stages.1.phases.0.lr=1e-6"])
    by_name = load_recipe(ROOT / "recipes" / "debug.yaml", ["schedule.stages.s4.phases.0.lr=1e-6"])
    assert by_name.resolved == by_index.resolved
    assert by_name.resolved != load_recipe(ROOT / "recipes" / "debug.yaml").resolved
    assert by_name.recipe.schedule.build().phases()[1].optimizers["student"].lr == pytest.approx(1e-6)
    with pytest.raises(UserError, match=r"schedule.stages has no item named 's2' \(names: 's8', 's4'\)"):
        load_recipe(ROOT / "recipes" / "debug.yaml", ["schedule.stages.s2.phases.0.lr=1e-6"])
    with pytest.raises(RecipeError, match=r"^command line: schedule.stages\[1\].phases\[0\].lr: expected a number"):
        load_recipe(ROOT / "recipes" / "debug.yaml", ["schedule.stages.s4.phases.0.lr=fast"])
    with pytest.raises(UserError, match=r"schedule.stages has several items named 's8'; address it by index"):
        load_recipe(ROOT / "recipes" / "debug.yaml", ["schedule.stages.1.name=s8", "schedule.stages.s8.phases.0.lr=1"])


def test_a_recipe_file_overrides_its_bases_items_by_name(tmp_path):
    """``overrides:`` in a recipe file: the command line's KEY=VALUE strings, applied after the files merge (a base's
    stage changed by name, where a list would replace the whole), then the command line's own; a mistake in one is
    the file's, named with the key."""
    debug = ROOT / "recipes" / "debug.yaml"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {debug}\noverrides: [schedule.stages.s4.phases.1.steps=7, train.batch_size=2]\n")
    loaded = load_recipe(child)
    assert loaded.resolved == load_recipe(debug, ["schedule.stages.1.phases.1.steps=7", "train.batch_size=2"]).resolved
    assert "overrides" not in loaded.resolved
    assert load_recipe(child, ["train.batch_size=3"]).recipe.train.batch_size == 3  # the command line comes last
    child.write_text(f"extends: {debug}\noverrides: [schedule.stages.s4.phases.1.steps=many]\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(child))}: schedule.stages\[1\].phases\[1\].steps: expected"):
        load_recipe(child)
    child.write_text(f"extends: {debug}\noverrides: [schedule.stages.s2.phases.1.steps=7]\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(child))}: overrides: bad override .* no item named 's2'"):
        load_recipe(child)
    child.write_text(f"extends: {debug}\noverrides: {{train.batch_size: 2}}\n")
    with pytest.raises(RecipeError, match="overrides: expected a list of KEY=VALUE strings"):
        load_recipe(child)


def test_a_recipe_file_appends_items_to_its_bases_lists(tmp_path):
    """``append:`` in a recipe file adds items to the end of lists of the merged tree (a base's ladder with one more
    stage, its report with one more row; named items by name); the base's items stay as they were, its overrides
    apply first, and a key that names no list is the file's mistake, named with the key."""
    debug = ROOT / "recipes" / "debug.yaml"
    base = load_recipe(debug)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {debug}\nappend:\n  schedule.stages:\n"
                     "    - {name: s2, student_steps: 2, phases: [{kind: mse, steps: 3, lr: 1.0e-5}]}\n"
                     "  schedule.stages.s4.phases: [{kind: mse, steps: 2, lr: 1.0e-6}]\n")
    loaded = load_recipe(child)
    stages = loaded.resolved["schedule"]["stages"]
    assert stages[:-1] != base.resolved["schedule"]["stages"]  # s4 gained a phase
    assert [s["name"] for s in stages] == ["s8", "s4", "s2"] and "append" not in loaded.resolved
    assert stages[1]["phases"][:-1] == base.resolved["schedule"]["stages"][1]["phases"]
    assert stages[1]["phases"][-1]["steps"] == 2 and stages[2]["student_steps"] == 2
    whole, extended = base.recipe.schedule.build().phases(), loaded.recipe.schedule.build().phases()
    assert [(p.index, p.start, p.end, p.options) for p in extended[: len(whole)]] == \
           [(p.index, p.start, p.end, p.options) for p in whole]  # the base's phases first, as they were
    assert [p.stage for p in extended[len(whole):]] == ["s4", "s2"] and extended[-1].options.teacher_steps == 4
    assert load_recipe(child, ["schedule.stages.s2.phases.0.steps=5"]).recipe.schedule.build().phases()[-1].steps == 5
    # a mistake in an appended item is the appending file's; one in the base's items stays the base's
    child.write_text(f"extends: {debug}\nappend:\n  schedule.stages:\n"
                     "    - {name: s2, student_steps: 2, phases: [{kind: mse, steps: many, lr: 1.0e-5}]}\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(child))}: schedule.stages\[2\].phases\[0\].steps: expected"):
        load_recipe(child)
    base = tmp_path / "base.yaml"
    base.write_text(debug.read_text().replace("{kind: adversarial, conditional: true, steps: 4,",
                                              "{kind: adversarial, conditional: true, steps: many,"))
    child.write_text("extends: base.yaml\nappend:\n  schedule.stages:\n"
                     "    - {name: s2, student_steps: 2, phases: [{kind: mse, steps: 3, lr: 1.0e-5}]}\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(base))}: schedule.stages\[1\].phases\[0\].steps: expected"):
        load_recipe(child)
    child.write_text(f"extends: {debug}\nappend: {{train.batch_size: [2]}}\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(child))}: append: bad append train.batch_size: "
                                          "the merged recipe has no list there"):
        load_recipe(child)
    child.write_text(f"extends: {debug}\nappend: [schedule.stages]\n")
    with pytest.raises(RecipeError, match="append: expected a mapping of dotted keys to lists"):
        load_recipe(child)


def test_a_cross_check_names_the_file_of_its_section_and_the_override_inside_it(tmp_path):
    """A mistake found across keys (here the schedule's: a warm-up as long as its phase) names the file that wrote
    the section and, as the other possible cause, the last override applied inside the section."""
    debug = ROOT / "recipes" / "debug.yaml"
    problem = r"schedule: stage 's4': discriminator_warmup \(500\) leaves the student no step"
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(debug))} \(or the command line's "
                                          rf"schedule.stages.1.phases.0.discriminator_warmup\): {problem}"):
        load_recipe(debug, ["schedule.stages.s4.phases.0.discriminator_warmup=500"])
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {debug}\noverrides: [schedule.stages.s4.phases.0.discriminator_warmup=500]\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(debug))} \(or {re.escape(str(child))}'s override "
                                          rf"schedule.stages.1.phases.0.discriminator_warmup\): {problem}"):
        load_recipe(child)
    own = tmp_path / "own.yaml"  # the file alone wrote it
    own.write_text(debug.read_text().replace("{kind: adversarial, conditional: true, steps: 4,",
                                             "{kind: adversarial, conditional: true, steps: 4, discriminator_warmup: 500,"))
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(own))}: {problem}"):
        load_recipe(own)


def test_interpolation_resolves(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {ROOT / 'recipes' / 'debug.yaml'}\nseed: 7\ndata:\n  size: ${{seed}}\n")
    assert load_recipe(child).recipe.data.config.size == 7


def test_ladder_schedule_is_pure():
    r = load_recipe(ROOT / "recipes" / "debug.yaml").recipe
    phases = r.schedule.build().phases()
    assert [(p.name, p.kind, p.start, p.end) for p in phases] == [
        ("s8-mse", "mse", 0, 6), ("s4-cond", "adversarial", 6, 10), ("s4-uncond", "adversarial", 10, 14)]
    assert phases[0].optimizers_at(0) == ["student"]
    assert phases[1].optimizers_at(7) == ["discriminator", "student"]  # D steps before G
    assert phases[1].options.conditional and not phases[2].options.conditional
    assert phases[1].optimizers["student"].betas == (0.0, 0.99)
    with pytest.raises(ValueError):
        phases[0].optimizers_at(6)
