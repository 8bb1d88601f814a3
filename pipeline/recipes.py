"""The paper's recipes: extract ONE teacher cache, train every row's student from it, evaluate, tabulate.

usage: python pipeline/recipes.py RECIPE --data DATA.toml --teacher-checkpoint CKPT --out DIR
           [--imagenet-r50 PATH] [--imagenet-r50q PATH] [--gpus N]
           [--nnodes N --node-rank R --master-addr A [--master-port P]] [--dry-run]

RECIPE is a name from pipeline/recipes/ (e.g. coco_r152_r50_fpn) or the path of a recipe TOML.
A recipe is data: the teacher, the extraction settings, and one [[rows]] table per student run
(a row without `preset` is the plain student, trained without the cache). See docs/recipes.md.

Steps, each skipped when its output exists, so re-running the same command resumes:
  1. extract  -> CACHE (skipped when `defeat-cache inspect --json CACHE` says complete)
  2. train    -> OUT/runs/ROW/final.pt, one per row (`--resume` continues a killed run)
  3. eval     -> OUT/runs/ROW/eval.json, one per row (one process on one GPU; node 0 only)
  4. tables   -> OUT/report/ (`defeat-cache report`: report.md, runs.csv, plots) and OUT/paper_vs_ours.md
With --gpus > 1 or --nnodes > 1, extract and train run under torchrun. Multi-node runs need
OUT (and the cache) on a filesystem every node sees; start the same command on every node.

--dry-run prints every command (shell-quoted, one per line; everything else starts with '#')
and checks the recipe without running anything: exit code 0 when all checks pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # recipe_toml.py, next to this script
from recipe_toml import REPO, Recipe, RecipeError, Row, list_recipes, load_recipe, recipe_path  # noqa: E402

PAPER_GLOBAL_BATCH = 32  # 8 GPUs x 4 images: the batch the recipes' lr_batch32 is given for
ROW_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*$")  # a folder name, and no '=' (report's NAME=RUN_DIR)
IMAGENET_KINDS = ("r50", "r50q")  # row key `imagenet` -> option --imagenet-KIND


# ---------------------------------------------------------------------------------------------
# checks (dry run and before a real run)


def check(recipe: Recipe, args) -> tuple[list[str], list[str]]:
    """(problems, warnings). In a dry run, missing input files are warnings; otherwise problems."""
    from defeat_cache.distill.compat import IncompatibleError, TeacherFacts, check_compatible
    from defeat_cache.distill.presets import load_preset
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.views import VIEW_NAMES, ViewSet

    problems, warnings = [], []
    missing = warnings if args.dry_run else problems

    teacher = None
    try:
        teacher = load_model_spec(recipe.teacher)
    except Exception as e:  # DataError, or anything a broken TOML raises
        problems.append(f"teacher: {e}")

    names = [r.name for r in recipe.rows]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"row name {name!r} is used more than once (each row needs its own run folder)")
    for name in names:
        if not ROW_NAME.match(name):
            problems.append(f"row name {name!r}: use letters, digits and _ . + - only")

    try:
        ViewSet.parse(recipe.extract["views"])
    except ValueError:
        problems.append(f"[extract] views = {recipe.extract['views']!r}: choose from {','.join(VIEW_NAMES)}")

    for row in recipe.rows:
        student = None
        try:
            student = load_model_spec(row.student)
        except Exception as e:
            problems.append(f"row {row.name}: student: {e}")
        preset = None
        if row.preset is None:
            if row.overrides:
                problems.append(f"row {row.name}: `set` needs a preset (a row without preset is plain training)")
        else:
            try:
                preset = load_preset(row.preset, row.overrides)
            except Exception as e:
                problems.append(f"row {row.name}: preset: {e}")
        if teacher is not None and student is not None:
            if student.preprocessing != teacher.preprocessing:
                problems.append(f"row {row.name}: student {student.name} preprocessing {student.preprocessing} "
                                f"differs from teacher {teacher.name} {teacher.preprocessing}")
            if preset is not None:  # the rule the distiller applies, to the cache this recipe extracts
                cache = TeacherFacts.of_spec(teacher, with_backbone=recipe.extract["backbone"])
                try:
                    check_compatible(student, cache, preset)
                except IncompatibleError as e:
                    problems.extend(f"row {row.name}: {p}" for p in e.problems)
        if row.imagenet is not None and row.imagenet not in IMAGENET_KINDS:
            problems.append(f"row {row.name}: imagenet = {row.imagenet!r}; choose one of {', '.join(IMAGENET_KINDS)}")

    # inputs given on the command line
    if args.data is None:
        missing.append("--data not given (commands show DATA.toml)")
    elif not Path(args.data).is_file():
        missing.append(f"--data {args.data}: file not found")
    else:
        problems.extend(check_data_toml(Path(args.data), recipe))
    if args.teacher_checkpoint is None:
        missing.append("--teacher-checkpoint not given (commands show TEACHER.pt)")
    elif not Path(args.teacher_checkpoint).is_file():
        missing.append(f"--teacher-checkpoint {args.teacher_checkpoint}: file not found")
    for kind in sorted({r.imagenet for r in recipe.rows if r.imagenet in IMAGENET_KINDS}):
        path = getattr(args, f"imagenet_{kind}")
        users = ", ".join(r.name for r in recipe.rows if r.imagenet == kind)
        if path is None:
            missing.append(f"--imagenet-{kind} not given: rows {users} would start from random weights "
                           "(the paper initialises students from ImageNet)")
        elif not Path(path).is_file():
            missing.append(f"--imagenet-{kind} {path}: file not found")

    # launch settings
    if args.gpus < 1 or args.nnodes < 1 or args.batch_per_gpu < 1:
        problems.append("--gpus, --nnodes and --batch-per-gpu must be >= 1")
    if args.nnodes > 1 and not args.master_addr:
        problems.append("--nnodes > 1 needs --master-addr (the address of node 0)")
    if not 0 <= args.node_rank < args.nnodes:
        problems.append(f"--node-rank {args.node_rank} must be in 0..{args.nnodes - 1}")
    if not args.dry_run and launcher(args)[0] == "torchrun" and shutil.which("torchrun", path=tool_path()) is None:
        problems.append("torchrun not found next to this Python or on PATH")
    return problems, warnings


def check_data_toml(path: Path, recipe: Recipe) -> list[str]:
    """The dataset TOML parses, is of the recipe's format and has the splits the recipe uses."""
    from defeat_cache.data.dataset import read_toml
    from defeat_cache.errors import UserError

    try:
        data = read_toml(path, "dataset TOML")
    except UserError as e:
        return [f"--data {e}"]
    problems = []
    fmt = data.get("format", "coco")
    if fmt != recipe.data_format:
        problems.append(f"--data {path}: format {fmt!r}, but recipe {recipe.name} is for {recipe.data_format!r}")
    for split in (recipe.extract["split"], recipe.eval_split):
        if not isinstance(data.get(split), dict):
            problems.append(f"--data {path}: no [{split}] section (recipe {recipe.name} uses it)")
    return problems


# ---------------------------------------------------------------------------------------------
# the commands


@dataclass
class Step:
    kind: str  # extract | train | eval | table
    argv: list[str]
    output: str  # what exists when the step is done
    row: Row | None = None


def launcher(args) -> list[str]:
    """`defeat-cache` alone, or `torchrun ... -m defeat_cache` for several GPUs or nodes."""
    if args.gpus == 1 and args.nnodes == 1:
        return ["defeat-cache"]
    cmd = ["torchrun", f"--nproc_per_node={args.gpus}"]
    if args.nnodes > 1:
        cmd += [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}",
                f"--master_addr={args.master_addr}", f"--master_port={args.master_port}"]
    else:
        cmd += ["--standalone"]  # a free local port: several recipes can share a machine
    return cmd + ["-m", "defeat_cache"]


def global_batch(args) -> int:
    return args.gpus * args.nnodes * args.batch_per_gpu


def learning_rate(recipe: Recipe, args) -> str:
    """The paper's lr scaled linearly from batch 32 to this run's global batch, as the CLI gets it."""
    lr = recipe.lr_batch32 * global_batch(args) / PAPER_GLOBAL_BATCH
    return format(round(lr, 10), "g")


def cache_path(args) -> str:
    return args.cache or str(Path(args.out) / "cache")


def run_dir(args, row: Row) -> Path:
    return Path(args.out) / "runs" / row.name


def plan(recipe: Recipe, args) -> list[Step]:
    data = args.data or "DATA.toml"
    cache = cache_path(args)
    ex = recipe.extract
    run = launcher(args)

    extract = run + ["extract", "--teacher", recipe.teacher,
                     "--checkpoint", args.teacher_checkpoint or "TEACHER.pt",
                     "--data", data, "--out", cache, "--split", ex["split"],
                     "--views", ex["views"], "--codec", ex["codec"]]
    if ex["proposals"] is not None:
        extract += ["--proposals", str(ex["proposals"])]
    if ex["backbone"]:
        extract += ["--backbone"]
    extract += ["--device", "cuda", "--workers", str(args.workers)]
    steps = [Step("extract", extract, cache)]

    for row in recipe.rows:
        out = run_dir(args, row)
        train = run + ["train", "--student", row.student, "--data", data, "--out", str(out)]
        if row.preset is not None:
            train += ["--cache", cache, "--distill", row.preset]
            for o in row.overrides:
                train += ["--set", o]
        train += ["--epochs", format(recipe.epochs, "g"), "--batch-size", str(args.batch_per_gpu),
                  "--lr", learning_rate(recipe, args), "--device", "cuda", "--workers", str(args.workers)]
        weights = getattr(args, f"imagenet_{row.imagenet}", None) if row.imagenet else None
        if weights:
            train += ["--init-weights", weights]
        train += ["--resume"]
        steps.append(Step("train", train, str(out / "final.pt"), row))

    # Evaluation is not distributed: one process on one GPU, on node 0 only.
    if args.node_rank == 0:
        for row in recipe.rows:
            out = run_dir(args, row)
            steps.append(Step("eval", ["defeat-cache", "eval", "--checkpoint", str(out / "final.pt"),
                                       "--data", data, "--split", recipe.eval_split, "--device", "cuda",
                                       "--workers", str(args.workers), "--json", str(out / "eval.json")],
                              str(out / "eval.json"), row))
        report = Path(args.out) / "report"
        table = [sys.executable, "-m", "defeat_cache", "report", "--out", str(report)]
        table += [f"{row.name}={run_dir(args, row)}" for row in recipe.rows]
        steps.append(Step("table", table, str(report / "report.md")))
    return steps


# ---------------------------------------------------------------------------------------------
# running


def tool_path() -> str:
    """PATH with this Python's bin folder first, so the venv's defeat-cache and torchrun are used."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def run_command(argv: list[str]) -> int:
    return subprocess.run(argv, env={**os.environ, "PATH": tool_path()}).returncode


def cache_complete(cache: str) -> bool:
    """What `defeat-cache inspect --json` says; a missing or unreadable cache is not complete."""
    if "://" not in cache and not Path(cache).exists():
        return False
    result = subprocess.run(["defeat-cache", "inspect", "--json", cache], capture_output=True, text=True,
                            env={**os.environ, "PATH": tool_path()})
    try:
        return result.returncode == 0 and bool(json.loads(result.stdout).get("complete"))
    except json.JSONDecodeError:
        return False


def is_done(step: Step) -> bool:
    if step.kind == "extract":
        return cache_complete(step.output)
    if step.kind in ("train", "eval"):
        return Path(step.output).is_file()
    return False  # the tables are cheap: always rewritten


def paper_table(recipe: Recipe, args) -> str:
    """Paper vs ours per row, and each row's gain over the plain student, in recipe.metric x 100."""
    def ours(row: Row) -> float | None:
        path = run_dir(args, row) / "eval.json"
        if not path.is_file():
            return None
        value = json.loads(path.read_text()).get(recipe.metric)
        return None if value is None else 100 * value

    def fmt(value: float | None, sign: bool = False) -> str:
        return "" if value is None else (f"{value:+.1f}" if sign else f"{value:.2f}")

    base = next((r for r in recipe.rows if r.preset is None), None)
    base_paper, base_ours = (base.paper, ours(base)) if base else (None, None)
    lines = [f"# {recipe.description}", "",
             f"Teacher {Path(recipe.teacher).stem}" + (f" (paper {recipe.teacher_paper})" if recipe.teacher_paper else "")
             + f"; metric {recipe.metric} x 100 on the [{recipe.eval_split}] split; global batch {global_batch(args)}, "
             f"lr {learning_rate(recipe, args)}.", "",
             "| row | student | preset | paper | ours | ours - paper | gain paper | gain ours |",
             "|---|---|---|---|---|---|---|---|"]
    for row in recipe.rows:
        o = ours(row)
        gain_paper = row.paper - base_paper if row.paper is not None and base_paper is not None else None
        gain_ours = o - base_ours if o is not None and base_ours is not None else None
        diff = o - row.paper if o is not None and row.paper is not None else None
        preset = (row.preset or "(plain)") + "".join(f" {s}" for s in row.overrides)
        lines.append(f"| {row.name} | {Path(row.student).stem} | {preset} | {fmt(row.paper)} | {fmt(o)} | "
                     f"{fmt(diff, True)} | {fmt(gain_paper, True)} | {fmt(gain_ours, True)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"recipes: {', '.join(list_recipes())}")
    p.add_argument("recipe", help="name in pipeline/recipes/ or path of a recipe TOML")
    p.add_argument("--data", help="dataset TOML (required unless --dry-run)")
    p.add_argument("--teacher-checkpoint", help="trained teacher weights (required unless --dry-run)")
    p.add_argument("--out", help="output folder (default out/RECIPE)")
    p.add_argument("--cache", help="cache path (default OUT/cache); any path or URL every rank can reach")
    p.add_argument("--imagenet-r50", help="ImageNet ResNet-50 weights for the students' backbones")
    p.add_argument("--imagenet-r50q", help="ImageNet quarter-width ResNet-50 weights (r50q students)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1; the paper: 8)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--batch-per-gpu", type=int, default=4, help="images per GPU (default 4, the paper's); "
                   "lr scales linearly with the global batch")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--codec", choices=["fp32", "fp16", "bf16", "int8"], help="override the recipe's codec")
    p.add_argument("--views", help="override the recipe's views, e.g. orig (half the disk)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and check; run nothing")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(Path("out") / recipe_path(args.recipe).stem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as e:
        print(f"# ERROR: {e}")
        return 1
    if args.views:
        recipe.extract["views"] = args.views
    if args.codec:
        recipe.extract["codec"] = args.codec
    problems, warnings = check(recipe, args)
    steps = plan(recipe, args)

    print(f"# recipe {recipe.name}: {recipe.description}; {len(recipe.rows)} rows")
    print(f"# global batch {global_batch(args)} = {args.nnodes} node(s) x {args.gpus} GPU(s) x {args.batch_per_gpu}; "
          f"lr {learning_rate(recipe, args)} (paper: {recipe.lr_batch32:g} at batch {PAPER_GLOBAL_BATCH})")
    if args.node_rank != 0:
        print(f"# node {args.node_rank}: evaluation and tables run on node 0 only")
    for w in warnings:
        print(f"# WARNING: {w}")
    for p in problems:
        print(f"# ERROR: {p}")

    if args.dry_run:
        for step in steps:
            print(shlex.join(step.argv))
        print(f"# dry run: {len(steps)} commands, {len(warnings)} warnings, {len(problems)} problems")
        return 1 if problems else 0
    if problems:
        return 1

    Path(args.out).mkdir(parents=True, exist_ok=True)
    for step in steps:
        if is_done(step):
            print(f"# done, skipping: {shlex.join(step.argv)}", flush=True)
            continue
        print(shlex.join(step.argv), flush=True)
        rc = run_command(step.argv)
        if rc != 0:
            print(f"# ERROR: {step.kind} failed with exit code {rc}; re-run the same command to resume")
            return rc
        if step.kind in ("train", "eval") and not Path(step.output).is_file():
            print(f"# ERROR: {step.kind} ended without writing {step.output}; re-run the same command to resume")
            return 1
    if args.node_rank == 0:
        table = paper_table(recipe, args)
        (Path(args.out) / "paper_vs_ours.md").write_text(table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the defeat_cache package, also without an install
    sys.exit(main())
