"""The `defeat-cache` command. Thin: parse options, call library functions, print results."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__


def _user_errors(fn):
    """User mistakes (bad paths, configs, caches) end in one clear `Error:` line and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cache.errors import CacheError
        from .distributed import cleanup
        from .errors import UserError
        try:
            return fn(*args, **kwargs)
        except (UserError, CacheError, FileNotFoundError, FloatingPointError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training's own handler is set
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        finally:
            cleanup()  # under torchrun: leave the process group (NCCL warns otherwise)
    return wrapper


def _storage_option(fn):
    """`--storage-option KEY=VALUE` (repeatable): fsspec options for a cache given as a URL."""
    return click.option(
        "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
        help="fsspec option for a URL cache (s3://...), e.g. endpoint_url=http://127.0.0.1:9000; repeatable. "
             "Credentials come from the usual environment (AWS_ACCESS_KEY_ID, ...).")(fn)


def _storage_options(pairs) -> dict | None:
    from .cache.storage import parse_storage_options
    return parse_storage_options(pairs) or None


@click.group()
@click.version_option(__version__, prog_name="defeat-cache")
def main():
    """Offline DeFeat distillation of object detectors: extract a teacher cache once, train many students."""


@main.command("models")
def models_cmd():
    """List the detector zoo (configs/models/*.toml)."""
    from .models.zoo import list_models, load_model_spec
    for name in list_models():
        spec = load_model_spec(name)
        first = (spec.config.get("description") or "")
        click.echo(f"{name:16s} {spec.family:12s} {spec.backbone_title}"
                   f" fpn{spec.fpn_channels} input {spec.preprocessing.min_size}/{spec.preprocessing.max_size} {first}")


@main.group("data")
def data_cmd():
    """Datasets: generate the built-in synthetic one, summarise any."""


@data_cmd.command("shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the dataset to.")
@click.option("--train-images", default=1200, show_default=True)
@click.option("--val-images", default=200, show_default=True)
@click.option("--seed", default=0, show_default=True)
@_user_errors
def data_shapes(out, train_images, val_images, seed):
    """Generate the deterministic synthetic shapes dataset (COCO json + PNGs + data.toml)."""
    from .data.shapes import generate_shapes
    toml = generate_shapes(out, num_train=train_images, num_val=val_images, seed=seed)
    click.echo(str(toml))


@data_cmd.command("info")
@click.argument("data_toml", type=click.Path(dir_okay=False))
@click.option("--split", default="train", show_default=True)
@_user_errors
def data_info(data_toml, split):
    """Summarise a dataset split (images, boxes, classes, what is not trained on)."""
    from .data.dataset import load_dataset
    data = load_dataset(data_toml, split)
    click.echo(data.summary())
    click.echo(f"fingerprint {data.fingerprint()}")


def _train_options(**kw):
    from .engine.train import TrainOptions
    return TrainOptions(**kw)


@main.command("train")
@click.option("--student", required=True, help="Model name from `defeat-cache models` or a model TOML.")
@click.option("--data", "data_toml", required=True, type=click.Path(dir_okay=False), help="Dataset TOML.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--cache", default=None, help="Teacher cache to distil from (streamed; no teacher in memory): "
              "a folder or a URL (s3://bucket/cache.zarr).")
@click.option("--teacher", default=None, help="Online distillation: teacher model name (with --teacher-checkpoint).")
@click.option("--teacher-checkpoint", default=None, type=click.Path(dir_okay=False))
@click.option("--teacher-head", default=None, type=click.Path(dir_okay=False),
              help="With --cache and a preset with cls.rois = \"student\" (cls_student_rois): the teacher checkpoint "
                   "whose RoI box head alone scores the student's proposals on the cached features.")
@click.option("--teacher-head-model", default=None,
              help="Model name or TOML of --teacher-head (default: the teacher the cache's manifest records).")
@click.option("--distill", "preset", default=None, help="Distillation preset (configs/distill/NAME.toml or a path); "
              "`defeat` = the paper's full recipe. Default with --cache/--teacher: defeat.")
@click.option("--set", "overrides", multiple=True, help="Override a preset value, e.g. --set neck.alpha_bg=8.")
@click.option("--epochs", type=float, default=None, help="Epochs (default 12 x --schedule).")
@click.option("--schedule", type=float, default=1.0, show_default=True, help="Schedule multiplier (1 = 1x: 12 epochs, "
              "lr /10 at 8 and 11); lr steps scale with the epochs.")
@click.option("--max-iters", type=int, default=None, help="Stop after this many iterations (smoke runs).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Images per process.")
@click.option("--lr", type=float, default=None, help="Base learning rate (default: model's lr_per_image x global batch).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="SGD weight decay.")
@click.option("--lr-steps", default=None, metavar="EPOCHS",
              help="Epochs after which the lr drops by 10, comma-separated (default: 8/12 and 11/12 of the run, "
                   "i.e. 8,11 for 12 epochs); '' = never.")
@click.option("--warmup-iters", type=int, default=500, show_default=True, help="Linear lr warm-up iterations.")
@click.option("--warmup-factor", type=float, default=0.001, show_default=True,
              help="The warm-up's first lr, as a fraction of --lr.")
@click.option("--grad-clip", type=float, default=35.0, show_default=True,
              help="Max gradient norm (0 = no clipping).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (under torchrun: this rank's GPU).")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers per process.")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/last.pt.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run (removes that run's files only).")
@click.option("--eval-every", type=int, default=None, metavar="N",
              help="COCO eval on the val split every N epochs and after the last iteration "
                   "(metrics.jsonl, TensorBoard, best.pt).")
@click.option("--keep-epochs", is_flag=True, help="Also keep the model after each epoch (RUN_DIR/epoch_NN.pt).")
@click.option("--checkpoint-minutes", type=float, default=10.0, show_default=True,
              help="Minutes between RUN_DIR/last.pt rewrites (also written at the end and on Ctrl-C/SIGTERM).")
@click.option("--init-weights", default=None, type=click.Path(dir_okay=False),
              help="Detector or ImageNet-backbone state dict to start from.")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm under torchrun.")
@click.option("--no-amp", is_flag=True, help="Disable automatic mixed precision on CUDA.")
@click.option("--log-every", type=int, default=20, show_default=True)
@_storage_option
@_user_errors
def train_cmd(student, data_toml, out, cache, teacher, teacher_checkpoint, teacher_head, teacher_head_model, preset, overrides, epochs, schedule,
              max_iters, batch_size, lr, momentum, weight_decay, lr_steps, warmup_iters, warmup_factor, grad_clip,
              seed, device, workers, resume, force, eval_every, keep_epochs, checkpoint_minutes, init_weights,
              sync_bn, no_amp, log_every, storage_option):
    """Train a detector: plain, or distilled with DeFeat from a cache (--cache) or an online teacher (--teacher).

    Writes RUN_DIR (--out): config.json, metrics.jsonl, train.log, tb/ (TensorBoard), last.pt,
    final.pt, best.pt (--eval-every). Ctrl-C / SIGTERM writes last.pt and exits 130 / 143."""
    from .engine.schedule import parse_lr_steps
    from .engine.train import stop_exit_code, train
    distill = None
    if cache and teacher:
        raise click.UsageError("give either --cache (offline) or --teacher (online), not both")
    if (cache or teacher) or preset:
        if not (cache or teacher):
            raise click.UsageError("--distill needs a teacher: --cache CACHE or --teacher MODEL --teacher-checkpoint CKPT")
        if teacher and not teacher_checkpoint:
            raise click.UsageError("--teacher needs --teacher-checkpoint")
        from .distill.presets import load_preset
        distill = load_preset(preset or "defeat", overrides)
    elif overrides:
        raise click.UsageError("--set overrides a distillation preset; add --cache or --teacher")
    if storage_option and not cache:
        raise click.UsageError("--storage-option applies to a --cache URL (s3://...)")
    if (teacher_head or teacher_head_model) and not cache:
        raise click.UsageError("--teacher-head/--teacher-head-model apply to --cache (cls.rois = \"student\"); "
                               "with --teacher the online teacher's own box head is used")
    opts = _train_options(student=student, data=data_toml, out=out, epochs=epochs, schedule=schedule,
                          max_iters=max_iters, batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, lr_steps=parse_lr_steps(lr_steps) if lr_steps is not None else None,
                          warmup_iters=warmup_iters, warmup_factor=warmup_factor, grad_clip=grad_clip, seed=seed,
                          device=device, workers=workers, resume=resume, force=force, eval_every=eval_every,
                          keep_epochs=keep_epochs, checkpoint_minutes=checkpoint_minutes, init_weights=init_weights,
                          sync_bn=sync_bn, amp=not no_amp, log_every=log_every, distill=distill, cache=cache,
                          teacher=teacher, teacher_checkpoint=teacher_checkpoint,
                          teacher_head=teacher_head, teacher_head_model=teacher_head_model,
                          storage_options=_storage_options(storage_option))
    summary = train(opts)
    from .distributed import is_main_process
    if is_main_process():
        click.echo(json.dumps(summary))
    sys.exit(stop_exit_code(summary))  # 130 / 143 when Ctrl-C / SIGTERM stopped it (last.pt is written)


@main.command("extract")
@click.option("--teacher", required=True, help="Teacher model name (`defeat-cache models`) or model TOML.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Teacher weights (trained detector).")
@click.option("--data", "data_toml", required=True, type=click.Path(dir_okay=False), help="Dataset TOML.")
@click.option("--out", required=True, help="Cache path (a folder, or any URL zarr opens).")
@click.option("--split", default="train", show_default=True)
@click.option("--views", default="orig,hflip", show_default=True,
              help="Views to store; orig,hflip serves training's random horizontal flip.")
@click.option("--codec", default="fp16", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16", "int8", "compact"]),
              help="Feature codec (fp32 is lossless; compact: PCA basis + quantised coefficients, "
                   "~1/28 of fp16; see docs/benchmarks.md for sizes and errors).")
@click.option("--compact-step", type=float, default=None,
              help="compact codec: quantisation step in units of each item's feature rms "
                   "(default 2.0; larger = smaller cache, larger error).")
@click.option("--basis-items", default=64, show_default=True,
              help="compact codec: (image, view) items the per-level bases are fitted on, before any shard.")
@click.option("--proposals", default=1000, show_default=True, help="RPN proposals kept per image (after NMS).")
@click.option("--backbone", is_flag=True, help="Also store backbone stage features (backbone distillation).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--items-per-shard", type=int, default=None, help="Default: ~128 MB of features per shard.")
@click.option("--amp", is_flag=True, help="Run the teacher in mixed precision on CUDA (faster, less exact).")
@_storage_option
@_user_errors
def extract_cmd(teacher, checkpoint, data_toml, out, split, views, codec, compact_step, basis_items, proposals,
                backbone, batch_size, workers, device, items_per_shard, amp, storage_option):
    """Run the teacher once and write its features, proposals and RoI logits to a cache (resumable)."""
    from .cache.extract import ExtractOptions, extract
    from .distributed import is_main_process
    summary = extract(ExtractOptions(teacher=teacher, checkpoint=checkpoint, data=data_toml, out=out, split=split,
                                     views=views, codec=codec, proposals=proposals, backbone=backbone,
                                     batch_size=batch_size, workers=workers, device=device,
                                     items_per_shard=items_per_shard, amp=amp, compact_step=compact_step,
                                     basis_items=basis_items, storage_options=_storage_options(storage_option)))
    if is_main_process():  # under torchrun: one summary, not one per rank
        click.echo(json.dumps(summary))


@main.command("plan")
@click.option("--teacher", required=True, help="Teacher model name (`defeat-cache models`) or model TOML.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Teacher weights.")
@click.option("--data", "data_toml", required=True, type=click.Path(dir_okay=False), help="Dataset TOML.")
@click.option("--split", default="train", show_default=True)
@click.option("--views", default="orig,hflip", show_default=True)
@click.option("--codec", "codecs", default="fp32,fp16,bf16,int8,compact", show_default=True,
              help="Codecs to size, comma-separated.")
@click.option("--compact-step", type=float, default=None, help="compact codec: its step (default 2.0).")
@click.option("--proposals", default=1000, show_default=True)
@click.option("--backbone", is_flag=True, help="Size a cache with backbone stage features too.")
@click.option("--sample", "sample_images", default=16, show_default=True, help="Images the teacher runs on.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--amp", is_flag=True, help="Time the teacher in mixed precision on CUDA.")
@click.option("--ranks", default=1, show_default=True, help="Ranks for the extraction time estimate.")
@click.option("--out", default=None, help="Where the cache would go: reports whether its filesystem has the room "
                                          "(nothing is written there).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_user_errors
def plan_cmd(teacher, checkpoint, data_toml, split, views, codecs, compact_step, proposals, backbone, sample_images,
             batch_size, device, amp, ranks, out, as_json):
    """Size a cache before extracting it: bytes per view, total and extraction time for each codec."""
    from .cache.plan import PlanOptions, format_plan, plan_cache
    p = plan_cache(PlanOptions(teacher=teacher, checkpoint=checkpoint, data=data_toml, split=split, views=views,
                               codecs=tuple(c.strip() for c in codecs.split(",") if c.strip()),
                               compact_step=compact_step, proposals=proposals, backbone=backbone,
                               sample_images=sample_images, batch_size=batch_size, device=device, amp=amp,
                               ranks=ranks, out=out))
    click.echo(json.dumps(p, indent=2) if as_json else format_plan(p))


@main.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@_storage_option
@_user_errors
def inspect_cmd(cache, as_json, storage_option):
    """Show a cache's manifest, completeness, sizes per array and per image, and level shapes."""
    from .cache.reader import TeacherCache
    info = TeacherCache(cache, storage_options=_storage_options(storage_option), allow_incomplete=True).inspect()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    m = info["manifest"]
    prov = m.get("provenance", {})
    click.echo(f"cache      {cache}")
    click.echo(f"teacher    {prov.get('teacher', {}).get('name')}  sha256 {str(prov.get('teacher_checkpoint_sha256'))[:16]}")
    ds = prov.get("dataset", {})
    click.echo(f"dataset    {ds.get('name')}/{ds.get('split')}  fingerprint {ds.get('fingerprint')}")
    click.echo(f"views      {','.join(prov.get('views', []))}   codec {m.get('codec')}   schema {m.get('schema_version')}")
    click.echo(f"items      {info['items_done']}/{info['items_total']} done  "
               f"({info['shards_done']}/{info['shards_total']} shards)  complete={m.get('complete')}")
    lock = info.get("extraction_lock")
    if lock:
        click.echo(f"lock       extract.lock: {lock['holder']}" + (" (stale: that process is gone)" if lock["stale"] else ""))
    click.echo(f"size       {info['bytes_total'] / 1e6:.1f} MB total, {(info['bytes_per_item'] or 0) / 1e3:.1f} kB per item "
               f"({(info['feature_bytes_per_item'] or 0) / 1e3:.1f} kB features)")
    kinds = info.get("bytes_per_item_by_kind")
    if kinds:
        click.echo("per item   " + ", ".join(f"{k.replace('_', ' ')} {v / 1e3:.1f} kB" for k, v in kinds.items()))
    opts = m.get("layout", {}).get("codec_options")
    if opts:
        click.echo("codec      " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    for name, a in info["arrays"].items():
        click.echo(f"  {name:18s} {str(a['shape']):28s} {a['dtype']:8s} {(a['bytes_per_item'] or 0) / 1e3:9.1f} kB/item")
    for name, lv in info["levels"].items():
        if "explained_energy" in lv:  # basis codecs: what the stored rank keeps of the teacher's energy
            click.echo(f"  {name:18s} rank {lv['stored_channels']}/{lv['channels']}, "
                       f"explained energy {100 * lv['explained_energy']:.1f}%")


@main.command("verify")
@click.argument("cache")
@_storage_option
@_user_errors
def verify_cmd(cache, storage_option):
    """Read every chunk: checksums, finiteness, completeness. Exit code 0 only if the cache is clean."""
    from .cache.reader import TeacherCache
    from .progress import progress
    c = TeacherCache(cache, storage_options=_storage_options(storage_option), allow_incomplete=True)
    bar = progress(0, "verify", unit="shard")

    def step(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    report = c.verify(progress=step)
    bar.close()
    for p in report.problems:
        click.echo(f"PROBLEM: {p}")
    click.echo(f"{'OK' if report.ok else 'FAILED'}: {report.items_checked} items in "
               f"{report.shards_done}/{report.shards_total} shards checked, {len(report.problems)} problems")
    sys.exit(0 if report.ok else 1)


@main.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--from", "source", required=True, type=click.Choice(["mmdet", "detectron2"]),
              help="Where the checkpoint comes from (mmdetection 2.x/3.x, or detectron2 .pth/.pkl).")
@click.option("--model", required=True, help="Zoo model to convert for (`defeat-cache models`; the *_mmdet / *_d2 "
                                              "entries compute as the source does) or a model TOML.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="torchvision-format state dict to write.")
@click.option("--channels", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Colour order the source's first convolution expects (default: mmdet rgb unless its config says "
                   "to_rgb=False; detectron2 bgr). BGR filters are swapped so the result takes RGB.")
@_user_errors
def convert_cmd(checkpoint, source, model, out, channels):
    """Convert an mmdetection or detectron2 Faster R-CNN FPN / RetinaNet checkpoint into a zoo model's weights."""
    from .models.convert.files import convert_file
    summary = convert_file(checkpoint, source, model, out, channels=channels)
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    classes = summary["classes"]
    click.echo(f"wrote {summary['out']}: {summary['tensors']} tensors for {summary['model']}, "
               f"{summary['num_classes'] - 1} classes + background"
               + (f" ({', '.join(classes)})" if classes else ""))


@main.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="State dict to write (e.g. student.pth); its JSON sidecar goes beside it (student.json).")
@click.option("--model", default=None, help="Model name or TOML, where the checkpoint does not say it.")
@click.option("--data", "data_toml", default=None, type=click.Path(dir_okay=False),
              help="Dataset TOML whose classes the model has, where the checkpoint does not say them.")
@_user_errors
def export_cmd(checkpoint, out, model, data_toml):
    """Export a trained model: plain torchvision state dict (no adapters, no optimizer) + JSON sidecar."""
    from .models.export import export_student
    data = None
    if data_toml:
        from .data.dataset import load_dataset
        data = load_dataset(data_toml, "val")
    sidecar = export_student(checkpoint, out, model, data)
    tv = sidecar["torchvision"]
    click.echo(f"wrote {out} and {Path(out).with_suffix('.json')}: {sidecar['model']['name']}, "
               f"{len(sidecar['classes'])} classes; "
               + (f"loads in plain torchvision with torchvision.models.detection.{tv['builder']}" if tv
                  else "no torchvision builder makes this architecture: load it with defeat_cache.load_detector"))


@main.command("predict")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Any checkpoint form `eval` takes (an exported student, final.pt, a state dict with --model, ...).")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Detections JSON (COCO results format).")
@click.option("--draw", default=None, type=click.Path(file_okay=False),
              help="Also write each image with its detections drawn into this folder (PNG).")
@click.option("--model", default=None, help="Model name or TOML, where the checkpoint does not say it.")
@click.option("--data", "data_toml", default=None, type=click.Path(dir_okay=False),
              help="Dataset TOML: the class names and category ids where the checkpoint does not say them, "
                   "and the image ids of the files it lists.")
@click.option("--split", default="val", show_default=True, help="The --data split whose image ids the files get.")
@click.option("--score-threshold", type=float, default=0.05, show_default=True, help="Detections kept in --out.")
@click.option("--draw-threshold", type=float, default=0.3, show_default=True, help="Detections drawn with --draw.")
@click.option("--device", default="cpu", show_default=True)
@_user_errors
def predict_cmd(checkpoint, images, out, draw, model, data_toml, split, score_threshold, draw_threshold, device):
    """Detect objects in image files or folders: COCO results JSON with the dataset's category ids."""
    from .engine.predict_files import PredictOptions, predict_files
    summary = predict_files(PredictOptions(checkpoint=checkpoint, inputs=list(images), out=out, draw=draw, model=model,
                                           data=data_toml, split=split, device=device, score_threshold=score_threshold,
                                           draw_threshold=draw_threshold))
    click.echo(json.dumps(summary))


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A training checkpoint, an exported student, a torchvision-format state dict (plain or wrapped) "
                   "or an mmdetection/detectron2 file.")
@click.option("--data", "data_toml", required=True, type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="Model name or TOML: required where the checkpoint does not say it "
                                            "(state dicts, mmdetection/detectron2 files), checked where it does.")
@click.option("--split", default="val", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--classwise", is_flag=True, help="Also the AP of every class (a table; JSON: per_class).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Write the metrics here (fractions in [0, 1]; null for an area range without ground truth).")
@click.option("--detections", "detections_out", default=None, type=click.Path(dir_okay=False),
              help="Write the detections here: COCO results JSON with the dataset's own category ids.")
@_user_errors
def eval_cmd(checkpoint, data_toml, model, split, device, batch_size, workers, classwise, json_out, detections_out):
    """COCO bbox AP and AR (all 12 numbers; VOC07 mAP for VOC) of a checkpoint (torchrun: split over ranks)."""
    from .data.dataset import load_dataset
    from .distributed import init_from_env
    from .engine.evaluate import check_loader_options, evaluate
    from .engine.metrics_text import format_classwise, format_metrics
    from .models.detector import load_detector
    check_loader_options(batch_size, workers)  # before loading anything
    dev = init_from_env(device)
    data = load_dataset(data_toml, split)
    net = load_detector(checkpoint, model, data, dev)
    metrics = evaluate(net, data, net.info.preprocessing, dev, batch_size, workers, classwise=classwise,
                       detections_path=detections_out)
    if metrics is None:  # a torchrun rank other than 0: its detections went to rank 0
        return
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(metrics, indent=2))
    click.echo(format_metrics(metrics))
    if classwise:
        click.echo(format_classwise(metrics["per_class"]))


@main.command("report")
@click.argument("runs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.md, runs.csv, groups.csv, report.json and the PNG plots.")
@_user_errors
def report_cmd(runs, out):
    """Compare training runs: tables (mean ± sd over seeds) and loss/lr/AP plots. RUN_DIR or NAME=RUN_DIR each."""
    from .report import write_report
    written = write_report(list(runs), out)
    click.echo((Path(out) / "report.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
