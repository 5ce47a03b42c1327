"""Each bad input exits 2 with one message that names the problem, and changes nothing on disk."""

from __future__ import annotations

import pytest

from support import DEBUG_RECIPE, tree_snapshot
from lightning_distill.cli import main

GOOD = DEBUG_RECIPE.read_text()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


def _folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


def _symlink_loop(tmp_path, name):
    (tmp_path / name).symlink_to(name)
    return str(tmp_path / name)


def _undecodable_images(tmp_path):
    """A folder whose one image passes the header scan and fails to decode."""
    import io

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG", compress_level=0)
    (folder / "a.png").write_bytes(buf.getvalue()[:200])
    (folder / "a.txt").write_text("a red square")
    return f"data={{name: image_folder, root: '{folder}', resolution: 8, min_size: 8}}"


CASES = {
    "no image decodes": (lambda p: [str(DEBUG_RECIPE), _undecodable_images(p)], ["no image of the data set could be decoded"]),
    "recipe is a folder": (lambda p: [_folder(p, "r.yaml")], ["r.yaml is a folder"]),
    "recipe is a symlink loop": (lambda p: [_symlink_loop(p, "r.yaml")], ["cannot read recipe", "r.yaml", "loop"]),
    "base recipe is a symlink loop": (lambda p: [_symlink_loop(p, "b.yaml"), _write(p, "r.yaml", "extends: b.yaml\n")][1:],
                                      ["r.yaml", "extends: cannot read b.yaml"]),
    "override not UTF-8": (lambda p: [str(DEBUG_RECIPE), "seed=\udcff"], ["bad override", "not UTF-8 text"]),
    "malformed yaml": (lambda p: [_write(p, "r.yaml", "train: {batch_size: 4\n  oops: [")], ["r.yaml", "not valid YAML"]),
    "unknown top-level key": (lambda p: [_write(p, "r.yaml", GOOD + "trian: {}\n")], ["r.yaml", "trian", "Did you mean 'train'?"]),
    "unknown nested key": (lambda p: [_write(p, "r.yaml", GOOD.replace("batch_size: 4", "batch_sise: 4"))],
                           ["train.batch_sise", "Did you mean 'batch_size'?"]),
    "wrong type": (lambda p: [_write(p, "r.yaml", GOOD.replace("batch_size: 4", "batch_size: four"))],
                   ["r.yaml", "train.batch_size", "expected an integer", "'four'"]),
    "unknown component": (lambda p: [_write(p, "r.yaml", GOOD.replace("name: ns_gan", "name: ns_gam"))],
                          ["method.adversarial_loss.name", "unknown loss 'ns_gam'", "Did you mean 'ns_gan'?", "mse"]),
    "unknown component field": (lambda p: [_write(p, "r.yaml", GOOD.replace("name: conv, channels", "name: conv, chanels"))],
                                ["method.discriminator.head.chanels", "Did you mean 'channels'?"]),
    "missing recipe file": (lambda p: [str(p / "nope.yaml")], ["recipe file not found", "nope.yaml"]),
    "missing base recipe": (lambda p: [_write(p, "r.yaml", "extends: base_missing.yaml\n")], ["base_missing.yaml", "extended by"]),
    "extends loop": (lambda p: [_write(p, "a.yaml", "extends: b.yaml\n"), _write(p, "b.yaml", "extends: a.yaml\n")][:1],
                     ["extends forms a loop"]),
    "bad override syntax": (lambda p: [str(DEBUG_RECIPE), "train.batch_size"], ["bad override", "KEY=VALUE"]),
    "override of unknown key": (lambda p: [str(DEBUG_RECIPE), "train.lrr=3"], ["command line", "train.lrr"]),
    "override wrong type": (lambda p: [str(DEBUG_RECIPE), "seed=[1, 2]"], ["command line", "seed", "expected an integer"]),
    "bad literal": (lambda p: [str(DEBUG_RECIPE), "fabric.strategy=fsdp"], ["fabric.strategy", "Did you mean 'fsdp2'?"]),
    "missing required key": (lambda p: [_write(p, "r.yaml", "method: {name: distill, teacher: {name: toy}}\n")],
                             ["missing required key 'schedule'"]),
    "schedule inconsistency": (lambda p: [str(DEBUG_RECIPE), "schedule.stages.0.teacher_steps=30"],
                               ["teacher_steps (30) must be a multiple of student_steps (8)"]),
    "unimportable module": (lambda p: [str(DEBUG_RECIPE), "imports=[no_such_module_xyz]"], ["imports", "no_such_module_xyz"]),
    "bad interpolation": (lambda p: [_write(p, "r.yaml", GOOD.replace("seed: 0", "seed: ${nowhere}"))], ["nowhere"]),
    "not a mapping": (lambda p: [_write(p, "r.yaml", "- just\n- a list\n")], ["must be a mapping"]),
    "zero phase steps": (lambda p: [str(DEBUG_RECIPE), "schedule.stages.0.phases.0.steps=0"],
                         ["schedule.stages[0].phases[0].steps", "must be at least 1"]),
    "zero student steps": (lambda p: [str(DEBUG_RECIPE), "schedule.stages.0.student_steps=0"], ["must be at least 1"]),
    "zero log interval": (lambda p: [str(DEBUG_RECIPE), "train.log_every=0"], ["train.log_every", "must be at least 1"]),
    "unknown accelerator": (lambda p: [str(DEBUG_RECIPE), "fabric.accelerator=cdua"], ["Did you mean 'cuda'?"]),
    "component name not a string": (lambda p: [str(DEBUG_RECIPE), "method.name=[a]"], ["expected a method name"]),
    "renoise out of range": (lambda p: [str(DEBUG_RECIPE), "schedule.stages.1.phases.0.renoise_timesteps=[10, 1000]"],
                             ["renoise_timesteps must lie in [0, 1000)"]),
    "offload without fsdp2": (lambda p: [str(DEBUG_RECIPE), "fabric.offload_frozen=true"],
                              ["fabric.offload_frozen", "needs strategy: fsdp2"]),
    "regression loss as the adversarial loss": (lambda p: [str(DEBUG_RECIPE), "method.adversarial_loss.name=mse"],
                                                ["method.adversarial_loss", "'mse' is not an adversarial loss", "ns_gan"]),
    "recipe file of random bytes": (lambda p: [_write(p, "r.yaml", bytes(range(128, 256)) * 4)],
                                    ["r.yaml", "not a text file"]),
    "adversarial without discriminator": (lambda p: [str(DEBUG_RECIPE), "method.discriminator=null"],
                                          ["method.discriminator", "adversarial phases"]),
    "error in a list a child replaced": (
        lambda p: [_write(p, "base.yaml", GOOD),
                   _write(p, "child.yaml", "extends: base.yaml\nschedule:\n  name: ladder\n  stages:\n"
                                           "    - {name: x, teacher_steps: 4, student_steps: 2, phases: [{kind: mse}]}\n")][1:],
        ["child.yaml", "schedule.stages[0].phases[0].steps", "missing required key"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_a_clear_message(case, tmp_path, capsys):
    make_args, expected = CASES[case]
    args = make_args(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree_snapshot(tmp_path)
    code = main(["train", *args, "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert "Traceback" not in message, message
    assert len([line for line in message.splitlines() if line.startswith("error:")]) == 1, message
    for piece in expected:
        assert piece in message, f"{piece!r} not in {message!r}"
    assert tree_snapshot(tmp_path) == before, "a failed command must not write anything"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback(capsys, tmp_path, where):
    args = ["validate", str(tmp_path / "nope.yaml")]
    code = main(["--debug", *args] if where == "before" else [*args, "--debug"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "recipe file not found" in err


def test_resuming_a_folder_of_another_recipe_is_refused(cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("seed: 123\n")
    before = tree_snapshot(out)
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out))
    assert result.returncode == 2 and "different recipe" in result.stderr
    assert tree_snapshot(out) == before


def test_internal_errors_exit_1(cli, tmp_path):
    # a component that breaks while building is a bug, not user input: exit 1 with the traceback
    module = tmp_path / "broken_components.py"
    module.write_text(
        "from lightning_distill import CODECS\n"
        "@CODECS.register('broken')\n"
        "class Broken:\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('boom')\n"
    )
    result = cli("train", str(DEBUG_RECIPE), "--out", str(tmp_path / "run"), "imports=[broken_components]",
                 "codec=broken", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    assert "boom" in result.stderr
