"""pipeline/recipes.py: every paper recipe's dry run, its checks, and resuming a (faked) real run.

The script is imported and its main() called in-process: one torch import for all tests.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

from defeat_cache.engine.metrics import COCO_METRIC_NAMES

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
RECIPES = sorted(p.stem for p in (PIPELINE / "recipes").glob("*.toml"))


def _load_script():
    spec = importlib.util.spec_from_file_location("recipes_script", PIPELINE / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


recipes = _load_script()


def dry_run(capsys, recipe: str, *extra: str) -> tuple[int, list[list[str]], str]:
    """(exit code, commands as argv lists, full output)."""
    rc = recipes.main([recipe, "--dry-run", "--out", "out/test", *extra])
    text = capsys.readouterr().out
    commands = [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]
    return rc, commands, text


def subcommand(argv: list[str]) -> str:
    """extract/train/eval for defeat-cache commands (plain or torchrun), 'table' for the report."""
    if argv[0] == "defeat-cache":
        return argv[1]
    if argv[0] == "torchrun":
        return argv[argv.index("defeat_cache") + 1]
    assert argv[1:4] == ["-m", "defeat_cache", "report"], argv
    return "table"


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_all_paper_recipes_exist():
    assert set(RECIPES) >= {"coco_r152_r50_fpn", "coco_r50_r50q_fpn", "coco_r152_r50_retina",
                            "voc_r101_r50_fpn", "voc_r152_r50_fpn"}


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_one_extract_then_a_train_and_eval_per_row(capsys, name):
    recipe = recipes.load_recipe(name)
    rc, commands, text = dry_run(capsys, name)
    assert rc == 0, text
    kinds = [subcommand(c) for c in commands]
    assert kinds.count("extract") == 1
    assert kinds.count("train") == len(recipe.rows)
    assert kinds.count("eval") == len(recipe.rows)
    assert kinds.count("table") == 1
    assert kinds.index("extract") < kinds.index("train")
    assert all(c[0] == "defeat-cache" for c in commands if subcommand(c) != "table")  # 1 GPU: no torchrun

    trains = [c for c in commands if subcommand(c) == "train"]
    for row, train in zip(recipe.rows, trains):
        assert option(train, "--out").endswith(f"runs/{row.name}")
        assert "--resume" in train and option(train, "--device") == "cuda"
        if row.preset is None:
            assert "--cache" not in train and "--distill" not in train
        else:
            assert option(train, "--cache") == option(commands[0], "--out")
            assert option(train, "--distill") == row.preset
    evals = [c for c in commands if subcommand(c) == "eval"]
    assert [option(e, "--json") for e in evals] == [f"out/test/runs/{r.name}/eval.json" for r in recipe.rows]
    # without inputs the dry run still passes, saying what is missing
    assert "# WARNING: --data not given" in text and "# WARNING: --teacher-checkpoint not given" in text
    assert "# WARNING: --imagenet-r50" in text


@pytest.mark.parametrize("name", RECIPES)
def test_eight_gpus_use_torchrun_and_the_paper_lr(capsys, name):
    recipe = recipes.load_recipe(name)
    rc, commands, text = dry_run(capsys, name, "--gpus", "8")
    assert rc == 0, text
    for c in commands:
        kind = subcommand(c)
        if kind in ("extract", "train"):
            assert c[:3] == ["torchrun", "--nproc_per_node=8", "--standalone"]
            assert c[3:5] == ["-m", "defeat_cache"]
        if kind == "train":
            assert option(c, "--lr") == format(recipe.lr_batch32, "g")
            assert option(c, "--batch-size") == "4" and option(c, "--epochs") == "12"
    assert recipe.lr_batch32 == (0.02 if "retina" in name else 0.04)


def test_lr_scales_linearly_with_the_global_batch(capsys):
    for gpus, lr in (("2", "0.01"), ("1", "0.005"), ("4", "0.02")):
        rc, commands, _ = dry_run(capsys, "coco_r152_r50_fpn", "--gpus", gpus)
        assert rc == 0
        assert {option(c, "--lr") for c in commands if subcommand(c) == "train"} == {lr}
    rc, commands, _ = dry_run(capsys, "coco_r152_r50_retina", "--gpus", "2")
    assert {option(c, "--lr") for c in commands if subcommand(c) == "train"} == {"0.005"}


def test_multi_node_passes_rendezvous_and_leaves_eval_to_node_0(capsys):
    args = ["--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    rc, commands, text = dry_run(capsys, "coco_r50_r50q_fpn", *args)
    assert rc == 0, text
    extract = commands[0]
    assert extract[:6] == ["torchrun", "--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
                           "--master_addr=10.0.0.1", "--master_port=29500"]
    assert {option(c, "--lr") for c in commands if subcommand(c) == "train"} == {"0.08"}  # batch 64
    assert [subcommand(c) for c in commands] == ["extract", "train", "train"]
    rc, _, text = dry_run(capsys, "coco_r50_r50q_fpn", "--gpus", "8", "--nnodes", "2")
    assert rc == 1 and "--master-addr" in text


def test_voc_recipes_use_voc_inputs_and_neck_weights(capsys):
    for name in ("voc_r101_r50_fpn", "voc_r152_r50_fpn"):
        rc, commands, text = dry_run(capsys, name)
        assert rc == 0, text
        assert option(commands[0], "--teacher").endswith(f"configs/models/voc/{name.split('_')[1]}_fpn.toml")
        distilled = [c for c in commands if subcommand(c) == "train" and "--cache" in c]
        assert distilled and all(option(c, "--student").endswith("configs/models/voc/r50_fpn.toml")
                                 for c in distilled)
        assert all(c.count("--set") == 3 and "neck.alpha_obj=3" in c and "neck.alpha_bg=12" in c
                   and "neck.finest_scale=56" in c for c in distilled)  # the authors' VOC finest scale
    from defeat_cache.models.zoo import load_model_spec
    pre = load_model_spec(str(recipes.REPO / "configs/models/voc/r50_fpn.toml")).preprocessing
    assert (pre.min_size, pre.max_size) == (600, 1000)


def write_recipe(tmp_path: Path, rows: str, backbone: str = "false", teacher: str = "r152_fpn") -> str:
    path = tmp_path / "custom.toml"
    path.write_text(f'teacher = "{teacher}"\nlr_batch32 = 0.04\n[extract]\nbackbone = {backbone}\n' + rows)
    return str(path)


PLAIN = '[[rows]]\nname = "student"\nstudent = "r50_fpn"\n'


def test_typo_in_a_preset_fails_naming_it(capsys, tmp_path):
    recipe = write_recipe(tmp_path, PLAIN + '[[rows]]\nname = "kd"\nstudent = "r50_fpn"\npreset = "defeet"\n')
    rc, _, text = dry_run(capsys, recipe)
    assert rc == 1
    errors = [line for line in text.splitlines() if line.startswith("# ERROR")]
    assert len(errors) == 1 and "row kd" in errors[0] and "'defeet'" in errors[0]


def test_recipe_mistakes_are_reported_one_line_each(capsys, tmp_path):
    rows = (PLAIN + PLAIN  # duplicate name
            + '[[rows]]\nname = "bb"\nstudent = "r50_fpn"\npreset = "defeat_backbone"\n'  # cache has no backbone
            + '[[rows]]\nname = "ov"\nstudent = "r50_fpn"\npreset = "defeat"\nset = ["neck.alpha_bgg=1"]\n'
            + '[[rows]]\nname = "mod"\nstudent = "r50_fpnn"\npreset = "defeat"\n'
            + '[[rows]]\nname = "pre"\nstudent = "r18q_fpn_cpu"\npreset = "defeat"\n')  # other input size
    rc, _, text = dry_run(capsys, write_recipe(tmp_path, rows))
    assert rc == 1
    errors = "\n".join(line for line in text.splitlines() if line.startswith("# ERROR"))
    assert "'student' is used more than once" in errors
    assert "row bb" in errors and "backbone = true" in errors
    assert "row ov" in errors and "alpha_bgg" in errors
    assert "row mod" in errors and "r50_fpnn" in errors
    assert "row pre" in errors and "preprocessing" in errors
    assert len(errors.splitlines()) == 5


def test_retina_backbone_row_must_turn_cls_off(capsys, tmp_path):
    rows = '[[rows]]\nname = "bb"\nstudent = "r50_retina"\npreset = "defeat_backbone"\n'
    rc, _, text = dry_run(capsys, write_recipe(tmp_path, rows, backbone="true", teacher="r152_retina"))
    assert rc == 1 and "cls.enabled=false" in text


def test_unknown_recipe_and_data_checks(capsys, tmp_path):
    rc, _, text = dry_run(capsys, "coco_nope")
    assert rc == 1 and "coco_r152_r50_fpn" in text  # lists the available ones
    voc = tmp_path / "voc.toml"
    voc.write_text('format = "voc"\n[train]\nroot = "VOC2007"\nimage_set = "trainval"\n')
    rc, _, text = dry_run(capsys, "coco_r50_r50q_fpn", "--data", str(voc))
    assert rc == 1 and "format 'voc'" in text and "no [val] section" in text


def real_inputs(tmp_path: Path) -> list[str]:
    data = tmp_path / "data.toml"
    data.write_text('format = "coco"\n[train]\nannotations = "a.json"\n[val]\nannotations = "b.json"\n')
    for f in ("teacher.pt", "r50q.pth"):
        (tmp_path / f).write_bytes(b"")
    return ["--data", str(data), "--teacher-checkpoint", str(tmp_path / "teacher.pt"),
            "--imagenet-r50q", str(tmp_path / "r50q.pth"), "--out", str(tmp_path / "out")]


def test_real_run_refuses_missing_inputs(capsys, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(recipes, "run_command", lambda argv: ran.append(argv) or 0)
    args = real_inputs(tmp_path)
    args[args.index("--imagenet-r50q") + 1] = str(tmp_path / "missing.pth")
    assert recipes.main(["coco_r50_r50q_fpn", *args]) == 1
    assert "# ERROR: --imagenet-r50q" in capsys.readouterr().out and ran == []


def test_real_run_skips_finished_steps(capsys, monkeypatch, tmp_path):
    """A faked run writes each step's output; running again executes only the (cheap) tables."""
    ran = []
    complete = set()

    def fake_run(argv):
        kind = subcommand(argv)
        ran.append(kind)
        if kind == "extract":
            complete.add(option(argv, "--out"))
        elif kind == "train":
            run = Path(option(argv, "--out"))
            run.mkdir(parents=True, exist_ok=True)
            (run / "final.pt").write_bytes(b"")
            options = {"student": option(argv, "--student"), "seed": 0, "distill": None}
            if "--distill" in argv:
                options.update(cache=option(argv, "--cache"), distill={"name": option(argv, "--distill")})
            (run / "config.json").write_text(json.dumps({"options": options, "model": {"name": options["student"]}}))
        elif kind == "eval":
            ap = 0.33 if "defeat" in option(argv, "--json") else 0.29
            metrics = dict.fromkeys(COCO_METRIC_NAMES, ap)
            Path(option(argv, "--json")).write_text(json.dumps(metrics))
        else:  # the report, in this process (a subprocess would import torch again)
            assert kind == "table"
            from defeat_cache.cli import main as cli
            cli(argv[3:], standalone_mode=False)
        return 0

    monkeypatch.setattr(recipes, "run_command", fake_run)
    monkeypatch.setattr(recipes, "cache_complete", lambda cache: cache in complete)
    args = ["coco_r50_r50q_fpn", *real_inputs(tmp_path), "--gpus", "2"]
    assert recipes.main(args) == 0
    assert ran == ["extract", "train", "train", "eval", "eval", "table"]
    out = tmp_path / "out"
    report = (out / "report" / "report.md").read_text()
    assert "| defeat | r50q_fpn | ? | defeat | ? |" in report  # run, student, teacher, preset, codec (no cache here)
    assert "| 33.00 |" in report and "| 29.00 |" in report
    table = (out / "paper_vs_ours.md").read_text()
    assert "| defeat | r50q_fpn | defeat | 33.00 | 33.00 | +0.0 | +3.9 | +4.0 |" in table

    ran.clear()
    capsys.readouterr()
    assert recipes.main(args) == 0
    assert ran == ["table"]
    assert capsys.readouterr().out.count("# done, skipping:") == 5
