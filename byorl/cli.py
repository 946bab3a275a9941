"""The `byorl` command line: train, evaluate, export, experiments, galleries."""

import contextlib
import inspect
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, get_origin

import typer
from pydantic import BaseModel, ValidationError

from byorl.training.allocator import reexec_with_jemalloc
from byorl.training.config import Device, EvalMode, TrainConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def main():
    """BYORL: adversarially robust self-supervised image embeddings."""


def parse_eps(text: str) -> float:
    """'8/255' or '0.0314' -> float."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def merged(base: dict, overrides: dict) -> dict:
    """`base` with the non-None values of `overrides` (nested dicts merged key by key)."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict):
            out[k] = merged(out.get(k, {}), v)
        elif v is not None:
            out[k] = v
    return out


def validated(cls, d: dict):
    """`cls.from_dict(d)`, a validation error becoming a usage error that names the field."""
    try:
        return cls.from_dict(d)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise typer.BadParameter("; ".join(problems)) from None


FRACTIONS = ("eps", "step_size")  # budgets: their flags take fractions such as 8/255


class Flag(NamedTuple):
    """A config field as a command-line option: of its type (choices listed in --help), with
    its description as the help."""


    path: str  # the config field's, dotted
    type: Any
    help: str | None


def config_flags(model: type[BaseModel], renamed: dict[str, str], types: dict[str, Any],
                 skip: tuple[str, ...], prefix: str = "") -> dict[str, Flag]:
    """Flag (parameter) name -> Flag of every field of `model` and of its sections, named after
    the field or as `renamed` says (dotted path -> name); `types` gives a flag another type,
    `skip` leaves fields (or sections) to the command's own options."""
    flags = {}
    for name, field in model.model_fields.items():
        path = prefix + name
        if path in skip:
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            flags |= config_flags(field.annotation, renamed, types, skip, path + ".")
        else:
            flags[renamed.get(path, name)] = Flag(path, types.get(path, field.annotation),
                                                  field.description)
    return flags


# byorl train: the TrainConfig (--min-crop sets crop_scale; --device lists the choices, a
# config takes any torch device)
TRAIN_FLAGS = config_flags(
    TrainConfig,
    renamed={"attack.method": "attack", "data.source": "data", "data.root": "data_root"},
    types={"attack.eps": str, "attack.step_size": str, "device": Device},
    skip=("out", "augment.crop_scale", "augment.crop_ratio"))


def with_config_flags(flags: dict[str, Flag]):
    """A command with an option per flag after its first two (--out, --config), which it takes
    as **fields: typer reads the options from the signature. A flag not given is None (or an
    empty list), and leaves the base config's value."""

    def option(name: str, flag: Flag) -> inspect.Parameter:
        default = [] if get_origin(flag.type) is list else None
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 annotation=flag.type | None,
                                 default=typer.Option(default, help=flag.help))

    def decorate(command):
        fixed = list(inspect.signature(command).parameters.values())[:-1]
        options = [option(name, flag) for name, flag in flags.items()]
        command.__signature__ = inspect.Signature(fixed[:2] + options + fixed[2:])
        return command

    return decorate


def given_flags(flags: dict[str, Flag], values: dict) -> dict:
    """The flags given, as a nested dict of config fields (overrides[a][b] for path 'a.b')."""
    overrides: dict = {}
    for flag, value in values.items():
        if value in (None, []):
            continue
        *sections, name = flags[flag].path.split(".")
        section = overrides
        for part in sections:
            section = section.setdefault(part, {})
        section[name] = parse_eps(value) if name in FRACTIONS else value
    return overrides


@app.command()
@with_config_flags(TRAIN_FLAGS)
def train(
    out: Path = typer.Option(Path("runs/byorl"), help="Run directory (resumed if it exists)."),
    config: Path | None = typer.Option(None, help="A config.json to start from (e.g. a run's)."),
    min_crop: float | None = typer.Option(None, help="Smallest crop area fraction."),
    max_steps: int | None = typer.Option(None, help="Stop after this many steps (resumable)."),
    time_limit_min: float | None = typer.Option(None, help="Stop after this long (resumable)."),
    **fields,
):
    """Train a BYORL (or BYOL, --attack none) encoder. Defaults are the paper's."""
    from byorl.training.train import train as run_train

    base = out / "config.json" if config is None and (out / "config.json").exists() else config
    flags = merged(given_flags(TRAIN_FLAGS, fields), {
        "out": str(out), "augment": {"crop_scale": (min_crop, 1.0) if min_crop else None}})
    saved = json.loads(base.read_text()) if base else TrainConfig().to_dict()
    cfg = validated(TrainConfig, merged(saved, flags))
    time_limit = time_limit_min * 60 if time_limit_min else None
    run = run_train(cfg, max_steps=max_steps, time_limit_s=time_limit)
    typer.echo(f"run directory: {run}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory or checkpoint file."),
    out: Path = typer.Option(..., help="Model directory to write (encoder.onnx, card.json, ...)."),
    images: str | None = typer.Option(
        None, help="Real images for the parity check (default: the run's training data)."),
    metrics: Path | None = typer.Option(
        None, help="evaluation.json of `byorl evaluate` (or any JSON) for the model card."),
):
    """Export the encoder to ONNX with a model card; fails unless ONNX Runtime matches PyTorch."""
    from byorl.training.export import export_encoder
    from byorl.training.progress import Bars

    command = ["byorl", "export", str(run), "--out", str(out)]
    command += ["--images", images] if images else []
    command += ["--metrics", str(metrics)] if metrics else []
    with Bars() as stages:
        card = export_encoder(run, out, json.loads(metrics.read_text()) if metrics else None,
                              images, command=shlex.join(command), progress=stages)
    typer.echo(f"{card['model_id']}: max |onnx - torch| {card['parity']['max_abs_diff']} -> {out}")


@app.command()
def knn(
    model: Path = typer.Argument(..., help="An exported model directory."),
    data: str = typer.Option(..., help="Gallery: its training images; queries: its test images "
                             "(cifar10, cifar100, an ImageFolder dir or .tar.gz)."),
    queries: int = typer.Option(2000, help="Random test images classified (0: all)."),
    seed: int = typer.Option(0, help="Seed of the query draw."),
    threads: int = typer.Option(0, help="ONNX Runtime threads (0: all cores)."),
    out: Path | None = typer.Option(None, help="Also write the result (JSON) here."),
    card: bool = typer.Option(False, help="Also put it on MODEL's card as metrics.knn "
                              "(encoder.onnx is untouched)."),
):
    """1-NN and 20-NN accuracy of the encoder's clean embeddings (cosine, majority vote, ties
    to the nearest); prints the result as JSON."""
    from byorl.training.knn import model_knn, write_to_card

    command = ["byorl", "knn", str(model), "--data", data, "--queries", str(queries),
               "--seed", str(seed)]
    result = model_knn(model, data, queries, seed, threads or None)
    result["command"] = shlex.join(command + (["--card"] if card else []))
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    if card:
        write_to_card(model, result)
    typer.echo(text)


gallery_app = typer.Typer(no_args_is_help=True, help="Galleries of a running service: import "
                          "a folder of images, export, restore.")
app.add_typer(gallery_app, name="gallery")
URL = typer.Option("http://127.0.0.1:8000", "--url", "--api", envvar="BYORL_URL",
                   help="The running service.")
API_KEY = typer.Option(None, envvar="BYORL_API_KEY", help="X-API-Key, if any.")
SHOWN_FAILURES = 10


@gallery_app.command("import")
def gallery_import(
    source: Path = typer.Argument(..., help="A folder (read recursively) or a .tar/.tar.gz of "
                                  "PNG/JPEG/WebP images."),
    index: str = typer.Option(..., help="The gallery to add to."),
    url: str = URL,
    api_key: str | None = API_KEY,
    batch: int = typer.Option(64, min=1, help="Images per add request."),
    create: bool = typer.Option(False, help="Create the gallery when it does not exist."),
    model: str | None = typer.Option(None, help="The model of a gallery --create makes "
                                     "(default: the service's first)."),
    factory: str = typer.Option("Flat", help="FAISS factory of a gallery --create makes."),
):
    """Add every image of SOURCE to a gallery, keyed by its path relative to SOURCE (e.g.
    cats/0001.jpg; in an archive, its member name). Resumable: keys already in the gallery
    are skipped, so running it again after an interruption adds only the rest. A file that
    fails (corrupt, unsupported format, too large, refused) is skipped with its reason. Exits
    1 only when nothing could be imported (no image found, or every one failed)."""
    from byorl.client import Client
    from byorl.gallery_io import is_archive
    from byorl.training.progress import Bars

    if not (source.is_dir() or is_archive(source)):
        raise typer.BadParameter(f"{source} is neither a folder nor a tar archive",
                                 param_hint="SOURCE")
    with Client(url, api_key=api_key) as client, service_errors(url), Bars() as bar:
        summary = client.import_images(index, source, batch=batch, create=create, model=model,
                                       factory=factory, progress=bar)
    typer.echo(f"{index}: {summary.added} added, {summary.present} already present (skipped), "
               f"{len(summary.failed)} failed, of {summary.files} files in {source}")
    for key, reason in summary.failed[:SHOWN_FAILURES]:
        typer.echo(f"  failed {key}: {reason}")
    if len(summary.failed) > SHOWN_FAILURES:
        typer.echo(f"  ... and {len(summary.failed) - SHOWN_FAILURES} more failed")
    if summary.nothing_done:
        raise typer.Exit(_fail(f"nothing imported from {source}"))


@gallery_app.command("export")
def gallery_export(
    name: str = typer.Argument(..., help="The gallery."),
    out: Path = typer.Argument(..., help="The folder to write (new or empty)."),
    url: str = URL,
    api_key: str | None = API_KEY,
):
    """Write a gallery to OUT: manifest.json (model id, card hash, factory, dim, count),
    items.jsonl (key and metadata per line), vectors.npy (float32) and pixels.npy (uint8),
    page by page. Nothing may write to the gallery meanwhile."""
    from byorl.client import Client
    from byorl.training.progress import Bars

    with Client(url, api_key=api_key) as client, service_errors(url), Bars() as bar:
        m = client.export_gallery(name, out, progress=bar)
    typer.echo(f"{m['count']} items of {name} ({m['model_id']}, card hash "
               f"{(m['onnx_sha256'] or 'unknown')[:12]}) -> {out}")


@gallery_app.command("restore")
def gallery_restore(
    source: Path = typer.Argument(..., help="A folder written by `byorl gallery export`."),
    index: str = typer.Option(..., help="The gallery to restore into (created when missing)."),
    url: str = URL,
    api_key: str | None = API_KEY,
    batch: int = typer.Option(256, min=1, help="Items per request (halved on a 413)."),
):
    """Store an export's items (vectors, pixels, metadata; nothing embedded again) in a
    gallery. Refused when the service does not serve the export's model from the same file
    (model id and card hash). Resumable: keys already in the gallery are skipped."""
    from byorl.client import Client
    from byorl.training.progress import Bars

    with Client(url, api_key=api_key) as client, service_errors(url), Bars() as bar:
        count = client.restore_gallery(source, index, batch=batch, progress=bar)
    typer.echo(f"{source} -> {index} ({count} items)")


def parse_threat(text: str):
    """'linf:8/255' -> ThreatModel."""
    from byorl.training.attacks import ThreatModel

    norm, _, eps = text.partition(":")
    return ThreatModel(norm, parse_eps(eps or "nan"))


@app.command()
def experiment(
    out: Path = typer.Option(Path("runs/experiment"), help="Output directory (resumed)."),
    config: Path | None = typer.Option(None, help="An experiment config.json to start from."),
    data: str | None = typer.Option(None, help="cifar10, cifar100, an ImageFolder dir or .tar.gz"),
    data_root: str | None = typer.Option(None, help="Where torchvision keeps CIFAR."),
    methods: str | None = typer.Option(
        None, help="Comma list of byorl, byol, at, uat_ft and names given with --encoder."),
    labels: str | None = typer.Option(
        None, help="Comma list of label amounts: fractions <= 1 or counts, e.g. 0.01,0.1,1"),
    threat: list[str] = typer.Option([], help="NORM:EPS, repeatable, e.g. linf:8/255"),
    byorl: list[str] = typer.Option([], help="NORM=RUN: a BYORL run per norm, repeatable."),
    byol: str | None = typer.Option(None, help="A BYOL run (trained with --attack none)."),
    encoder: list[str] = typer.Option(
        [], help="NAME=RUN: one more encoder method (run, checkpoint or model dir), repeatable."),
    pretrain: Path | None = typer.Option(
        None, help="A train config.json: train the encoders not given with it."),
    heads: str | None = typer.Option(
        None, help="Comma list of head kinds per encoder cell: nonrobust (the paper's), l2 "
        "(L2 strength chosen on held-out images), robust (adversarial)."),
    head_min_steps: int | None = typer.Option(None, help="Least optimiser steps of a head."),
    arch: str | None = typer.Option(None, help="Baselines' architecture (match the encoders)."),
    width: int | None = typer.Option(None),
    baseline_steps: int | None = typer.Option(None, help="Optimiser steps of AT / UAT-FT."),
    teacher_steps: int | None = typer.Option(None, help="Steps of UAT-FT's pseudo-labeler."),
    eval_mode: EvalMode | None = typer.Option(
        None, help="full (the paper's suite, the default) or quick (smoke runs only)."),
    eval_size: int | None = typer.Option(None, help="Test images attacked (0: all)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N"),
    seed: int | None = typer.Option(None),
):
    """The grid of methods x label amounts x threat models (Fig. 3/4, 7/8): resumable, writes
    results.{csv,json,md} and figures/ to OUT."""
    from byorl.training.experiment import ExperimentConfig, run_experiment
    from byorl.training.progress import Bars

    base = out / "config.json" if config is None and (out / "config.json").exists() else config
    flags = {
        "out": str(out), "data": data, "data_root": data_root,
        "methods": methods.split(",") if methods else None,
        "label_amounts": labels.split(",") if labels else None,
        "threats": [vars(parse_threat(t)) for t in threat] or None,
        "byorl_checkpoints": dict(item.partition("=")[::2] for item in byorl),
        "byol_checkpoint": byol,
        "encoders": dict(item.partition("=")[::2] for item in encoder),
        "pretrain": json.loads(pretrain.read_text()) if pretrain else None,
        "heads": heads.split(",") if heads else None,
        "head": {"min_steps": head_min_steps},
        "baseline": {"arch": arch, "width": width, "steps": baseline_steps,
                     "teacher_steps": teacher_steps},
        "eval_mode": eval_mode, "eval_size": eval_size, "device": device, "seed": seed,
    }
    saved = json.loads(base.read_text()) if base else ExperimentConfig().to_dict()
    cfg = validated(ExperimentConfig, merged(saved, flags))

    with Bars("cells") as cells, Bars(position=1, leave=False) as steps:
        result = run_experiment(cfg, progress=cells, cell_progress=steps)
    typer.echo(f"{len(result['ran'])} cells run, {len(result['skipped'])} already done, "
               f"{len(result['busy'])} run by another process -> {out}")


@app.command()
def landscape(
    run: Path = typer.Argument(..., help="An encoder's run directory or checkpoint."),
    data: str = typer.Option("cifar10", help="cifar10, cifar100, an ImageFolder dir or .tar.gz"),
    out: Path = typer.Option(Path("landscape.png"), help="The figure to write."),
    threat: str = typer.Option("linf:8/255", help="NORM:EPS of the head, attack and ball."),
    labels: float = typer.Option(500, help="Labels for the linear head (fraction or count)."),
    robust_head: bool = typer.Option(True, help="Adversarially train the linear head."),
    head_min_steps: int = typer.Option(2000, help="Least optimiser steps of the head."),
    images: int = typer.Option(4, help="Random test images to draw."),
    resolution: int = typer.Option(21, help="Grid points per axis."),
    steps: int = typer.Option(20, help="PGD steps for the u direction."),
    val_size: int = typer.Option(1024, help="Held-out images for the head's early stopping."),
    seed: int = typer.Option(0),
):
    """Margin-loss landscapes around test images (Fig. 9/10), a gradient-masking check."""
    from byorl.training.figures import model_landscapes
    from byorl.training.linear_classifier import HeadConfig

    head = HeadConfig(robust=robust_head, min_steps=head_min_steps)
    lands = model_landscapes(run, data, out, parse_threat(threat), labels, head, images,
                             resolution, steps, val_size, seed)
    for land in lands:
        typer.echo(f"label {land['label']}: margin {land['clean_margin']:.3f} clean, "
                   f"{land['pgd_margin']:.3f} after PGD")
    typer.echo(f"-> {out}")


@app.command("retrieval-demo")
def retrieval_demo(
    byol: Path = typer.Option(..., help="The BYOL run, checkpoint or exported model."),
    byorl: Path = typer.Option(..., help="The BYORL run, checkpoint or exported model."),
    data: str = typer.Option("cifar10", help="Gallery = its training images, queries = test."),
    out: Path = typer.Option(Path("retrieval"), help="Directory for retrieval.{png,json}."),
    threat: str = typer.Option("linf:8/255", help="NORM:EPS of the attack."),
    k: int = typer.Option(5, help="Neighbours shown and compared."),
    queries: int = typer.Option(32, help="Random test images attacked."),
    gallery: int = typer.Option(5000, help="Random training images searched."),
    steps: int = typer.Option(20, help="AutoPGD steps."),
    toward: bool = typer.Option(False, help="Push toward an image of another class instead of "
                                "away from the clean embedding."),
    show: int = typer.Option(0, help="Which query the figure shows."),
    seed: int = typer.Option(0),
):
    """Fig. 1: attacked queries change BYOL's nearest neighbours, not BYORL's."""
    from byorl.training.retrieval import retrieval_demo as demo

    report = demo({"BYOL": byol, "BYORL": byorl}, data, out, parse_threat(threat), k, queries,
                  gallery, steps, toward, show, seed=seed)
    for name, s in report["encoders"].items():
        typer.echo(f"{name}: top-{k} overlap {s['topk_overlap_adversarial']:.3f} under attack, "
                   f"{s['topk_overlap_random']:.3f} under noise; top-1 changed "
                   f"{s['top1_changed_adversarial']:.1%}")
    typer.echo(f"-> {out}")

@app.command("demo-gallery")
def demo_gallery(
    api: str = URL,
    data: str = typer.Option("tests/data/cifar10-test-sample.npz", help="CIFAR-10 test images: "
                             "the shipped sample (.npz), a CIFAR-10 .tar.gz or ImageFolder."),
    per_class: int = typer.Option(100, help="Test images of each class in the gallery."),
    group: str = typer.Option("cifar10", help="Galleries are named GROUP--MODEL_ID."),
    replace: bool = typer.Option(False, help="Delete the group's galleries first."),
    api_key: str | None = API_KEY,
    audit: int = typer.Option(0, help="Then audit each gallery with this many held-out test "
                              "images as queries (the page's attack, measured)."),
    k: int = typer.Option(8, help="Neighbours compared by --audit."),
    eps: str = typer.Option("8/255", help="linf budget of --audit."),
    steps: int = typer.Option(20, help="AutoPGD steps of --audit."),
):
    """One gallery of CIFAR-10 test images per served model, for the demo page (GET /demo)."""
    from byorl.client import Client
    from byorl.demo_gallery import audit_demo_galleries, build_demo_galleries

    with Client(api, api_key=api_key) as client, service_errors(api):
        names = build_demo_galleries(client, data, per_class, group, replace, typer.echo)
        if audit:
            audit_demo_galleries(client, data, names, per_class, audit, k, parse_eps(eps),
                                 steps, typer.echo)
    typer.echo(f"-> {api.rstrip('/')}/demo")


@contextlib.contextmanager
def service_errors(url: str) -> Iterator[None]:
    """A command that talks to the service says what went wrong in one line and exits 1,
    without a traceback: the service not reachable (and how to start it), or a refusal (its
    status, code and message)."""
    import httpx

    from byorl.client import JobFailed, ServiceError
    from byorl.gallery_io import ExportError

    try:
        yield
    except httpx.TransportError as exc:
        raise typer.Exit(_fail(f"cannot reach the service at {url} ({type(exc).__name__}): "
                               "start it with `make run` (or pass --api URL)")) from None
    except (ServiceError, JobFailed) as exc:
        hint = " (set --api-key or BYORL_API_KEY)" if getattr(exc, "status", 0) == 401 else ""
        raise typer.Exit(_fail(f"the service at {url} refused: {exc}{hint}")) from None
    except ExportError as exc:
        raise typer.Exit(_fail(str(exc))) from None


def _fail(message: str) -> int:
    typer.echo(f"error: {message}", err=True)
    return 1


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run, checkpoint or exported model directory."),
    labels: float = typer.Option(500, help="Labels for the heads: a count (> 1) or a fraction."),
    head: str = typer.Option(
        "nonrobust", help="Comma list of nonrobust (the paper's protocol), l2 (L2 strength "
        "chosen on the held-out images), robust; or both (= nonrobust,robust)."),
    norm: str | None = typer.Option(None, help="linf or l2 (default: the run's)."),
    eps: str | None = typer.Option(None, help="e.g. 8/255 (default: the run's, or the paper's "
                                   "for another norm)."),
    mode: EvalMode = typer.Option(
        "full", help="full (the paper's attack suite) or quick (smoke runs only, labelled so)."),
    n_test: int = typer.Option(1000, help="Random test images attacked (0: all)."),
    out: Path = typer.Option(Path("runs/evaluation"), help="Directory for evaluation.{json,md}."),
    data: str | None = typer.Option(None, help="Image source (default: the run's)."),
    head_min_steps: int | None = typer.Option(None, help="Least optimiser steps of a head."),
    head_attack_steps: int | None = typer.Option(None, help="PGD steps training robust heads."),
    head_epochs: int | None = typer.Option(None, help="Head epochs (lr / 10 after half)."),
    head_steps_per_epoch: int | None = typer.Option(
        None, help="Fixed batches per head epoch (default: whole passes, >= min steps)."),
    val_size: int = typer.Option(1024, help="Held-out training images for early stopping."),
    seed: int = typer.Option(0, help="Seed of the label subset and the test images."),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
):
    """Fit linear heads on a label subset, attack them with the paper's suite; writes
    evaluation.json and evaluation.md to OUT and prints the tables."""
    from rich.console import Console
    from rich.markdown import Markdown

    from byorl.training.evaluate import evaluate_checkpoint, write_report
    from byorl.training.linear_classifier import HeadConfig
    from byorl.training.progress import Bars
    from byorl.training.reports import report_markdown

    heads = ("nonrobust", "robust") if head == "both" else tuple(head.split(","))
    overrides = {"min_steps": head_min_steps, "attack_steps": head_attack_steps,
                 "steps_per_epoch": head_steps_per_epoch, "epochs": head_epochs,
                 "decay_epoch": head_epochs // 2 if head_epochs else None}
    config = HeadConfig(**{k: v for k, v in overrides.items() if v is not None})

    with Bars() as report:
        result = evaluate_checkpoint(run, labels, heads, norm, parse_eps(eps) if eps else None,
                                     mode, n_test, data, config, val_size, seed, device, report)
    paths = write_report(result, out)
    Console().print(Markdown(report_markdown(result)))
    typer.echo(f"-> {', '.join(map(str, paths))}")


def run() -> None:
    """The `byorl` console script: the CLI under jemalloc where the machine has it (training
    steps spend a quarter of their time page-faulting under glibc's malloc; see allocator.py)."""
    reexec_with_jemalloc()
    app()


if __name__ == "__main__":
    run()
