"""The ``fxadapt`` command line (also ``python -m fxadapt``).

::

    fxadapt explain MODEL [--adapter CHECKPOINT] [--verbose] [--json]
    fxadapt convert SRC DST --to fxadapt|adapterhub|peft [--model MODEL] [--no-head] [--force]
    fxadapt info CHECKPOINT [--json]
    fxadapt bench [bench/models.py options]

``MODEL`` is a local model folder or a Hugging Face hub id (the local cache is used; ``HF_HUB_OFFLINE=1`` keeps
it offline). ``CHECKPOINT``/``SRC`` are adapter folders in any format fxadapt reads (its own, AdapterHub's,
PEFT's) or hub ids. Exit status: 0 success, 1 error (one line on stderr: ``fxadapt: error: ...``; add
``--debug`` for the traceback), 2 bad usage (argparse's message).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

FORMATS = ("fxadapt", "adapterhub", "peft")
# what each target format can hold (the writers refuse the rest; checked here first, before a model is loaded)
TARGET_METHODS = {"peft": ("lora", "ia3")}
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fxadapt",
        description="Adapters for Hugging Face models, compiled into the graph: inspect models and adapter "
        "checkpoints, convert checkpoints between fxadapt, AdapterHub and PEFT, run the CPU benchmark.",
        epilog="Exit status: 0 ok, 1 error, 2 bad usage. FXADAPT_PROGRESS=0 turns progress bars off.",
    )
    parser.add_argument("--version", action="version", version=f"fxadapt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "explain",
        help="print the sites found in each layer of a model",
        description="Load MODEL (a local folder or a hub id), capture its layers and print, per layer, the "
        "residual and module sites found, opaque submodules, and (with --adapter) the active adapter plan. "
        "Identical layers are shown collapsed.",
    )
    p.add_argument("model", metavar="MODEL", help="a local model folder or a Hugging Face hub id")
    p.add_argument("--adapter", metavar="CHECKPOINT", help="load this adapter first (any supported format)")
    p.add_argument(
        "--verbose", "-v", action="store_true", help="also list rejected candidates and leaf calls"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--revision", help="hub revision of MODEL")
    p.set_defaults(run=_explain)

    p = sub.add_parser(
        "convert",
        help="convert an adapter checkpoint to another format",
        description="Load the adapter SRC (fxadapt, AdapterHub or PEFT folder, or a hub id) into its base model "
        "and write it to DST in the --to format. The base model is --model, or the one the checkpoint records "
        "(PEFT's base_model_name_or_path, AdapterHub's model_name). A method the target format cannot hold is "
        "refused before anything is written; DST appears only when the conversion succeeded.",
    )
    p.add_argument("src", metavar="SRC", help="adapter folder or hub id")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument("--model", metavar="MODEL", help="base model folder or hub id (default: as recorded)")
    p.add_argument(
        "--model-class",
        metavar="CLASS",
        help="transformers class to load the base model with, e.g. BertForSequenceClassification "
        "(default: as recorded for the head, else AutoModel)",
    )
    p.add_argument("--num-labels", type=int, metavar="N", help="labels of the head (default: as recorded)")
    p.add_argument("--name", help="adapter name to write (default: the saved name)")
    p.add_argument("--no-head", action="store_true", help="convert the adapter only, not a saved head")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST")
    p.set_defaults(run=_convert)

    p = sub.add_parser(
        "info",
        help="describe an adapter checkpoint",
        description="Print a checkpoint's format, method, base model, sites, parameter count and size on disk, "
        "without loading a model.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="adapter folder or hub id")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=_info)

    p = sub.add_parser(
        "bench",
        add_help=False,
        help="run the CPU model benchmark (bench/models.py of a source checkout)",
        description="Runs bench/models.py with the given options (see `fxadapt bench --help`).",
    )
    p.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")  # exits with status 2
    try:
        return int(args.run(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("fxadapt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line; the traceback only on request
        if args.debug:
            traceback.print_exc()
        print(f"fxadapt: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _message(exc: BaseException) -> str:
    from .errors import FxAdaptError

    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    if isinstance(exc, (FxAdaptError, CommandError)):
        return text
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return f"{text} (rerun with --debug for the traceback)"
    if isinstance(exc, (FileNotFoundError, PermissionError, ValueError)):
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"


# ------------------------------------------------------------------------------------------------------------
# loading


def _quiet_libraries() -> None:
    """Library chatter a command-line user did not ask for (torchao's CUDA extension notes on a CPU machine)."""
    import logging

    from .progress import progress_enabled

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree"):  # torchao's import-time notes (CUDA extensions, pytree)
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress_enabled():  # the same rule as fxadapt's bars: a terminal, or FXADAPT_PROGRESS
        hf_logging.disable_progress_bar()


def _load_model(
    model: str, cls_name: str | None = None, num_labels: int | None = None, revision: str | None = None
) -> Any:
    missing = _missing_path("model folder", model)
    if missing is not None:
        raise missing
    _quiet_libraries()
    import transformers

    if cls_name:
        cls = getattr(transformers, cls_name, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise CommandError(
                f"model class {cls_name!r} is not a transformers model class; expected e.g. "
                "'BertForSequenceClassification' or 'AutoModel'"
            )
    else:
        cls = transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if revision:
        kwargs["revision"] = revision
    try:
        return cls.from_pretrained(model, **kwargs).eval()
    except OSError as exc:
        raise CommandError(
            f"cannot load model {model!r}: {' '.join(str(exc).split())[:300]} — expected a local model folder "
            "or a hub id in the local cache"
        ) from exc


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "~", os.sep)) or value.count("/") > 1 or (os.altsep or os.sep) in value[:1]


def _missing_path(what: str, value: str) -> CommandError | None:
    if _looks_like_path(value) and not Path(value).expanduser().exists():
        return CommandError(
            f"{what} {value!r} does not exist; expected a folder (or a hub id like 'org/name')"
        )
    return None


def _resolve(path_or_id: str) -> Path:
    from .formats.hub import resolve

    missing = _missing_path("adapter folder", path_or_id)
    if missing is not None:
        raise missing
    return resolve(Path(path_or_id).expanduser() if _looks_like_path(path_or_id) else path_or_id)


def _read_meta(folder: Path) -> dict[str, Any]:
    from .formats import read_json

    return read_json(folder / "adapter_config.json")


def _source(folder: Path) -> dict[str, Any]:
    """What a checkpoint folder says about itself: format, method, base model, head (class, labels)."""
    from .formats import detect_format

    fmt = detect_format(folder)
    if fmt == "adapterhub-fusion":
        raise CommandError(
            f"{str(folder)!r} holds AdapterFusion layers, not an adapter; convert the fused adapters themselves"
        )
    meta = _read_meta(folder)
    info: dict[str, Any] = {"format": fmt, "meta": meta, "base": None, "head_class": None, "num_labels": None}
    if fmt == "fxadapt":
        config = meta.get("config") or {}
        info["method"] = config.get("method")
        head = meta.get("head") or None
        info["has_head"] = bool(head) and (folder / "head_model.safetensors").is_file()
        if head:
            info["head_class"], info["num_labels"] = head.get("architecture"), head.get("num_labels")
        info["base"] = (meta.get("base_model") or {}).get("name_or_path")
    elif fmt == "peft":
        info["method"] = str(meta.get("peft_type", "")).lower() or None
        info["base"] = meta.get("base_model_name_or_path")
        info["has_head"] = bool(meta.get("modules_to_save"))
    else:  # adapterhub
        from .formats.adapterhub import resolve_config

        config = resolve_config(meta.get("config"), meta.get("version"), str(folder))
        info["method"] = "lora" if config.get("architecture") == "lora" else "bottleneck"
        info["base"] = meta.get("model_name")
        head_file = folder / "head_config.json"
        info["has_head"] = head_file.is_file()
        if info["has_head"]:
            head = json.loads(head_file.read_text())
            info["head_class"], info["num_labels"] = head.get("model_class"), head.get("num_labels")
    return info


# ------------------------------------------------------------------------------------------------------------
# commands


def _explain(args: argparse.Namespace) -> int:
    import fxadapt

    model = _load_model(args.model, revision=args.revision)
    if args.adapter:
        fxadapt.load_adapter(model, args.adapter, load_head=False)
    report = fxadapt.explain(model, verbose=args.verbose)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


def _check_target(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise CommandError(f"DST {str(dst)!r} is a file; expected a folder to create")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CommandError(f"DST {str(dst)!r} exists and is not empty; choose another folder or pass --force")


def _commit_folder(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` folder to ``dst`` (replacing an existing ``dst`` only once ``tmp`` is complete)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alternatives(target: str, source: str) -> list[str]:
    alts = [f for f in FORMATS if f not in (target, source)]
    return alts if "fxadapt" in alts or target == "fxadapt" else ["fxadapt", *alts]


def _convert(args: argparse.Namespace) -> int:
    import fxadapt

    from .progress import track

    dst = Path(args.dst)
    _check_target(dst, args.force)
    steps = iter(track(range(4), desc="fxadapt: converting", unit="step", delay=0.5))
    next(steps, None)
    folder = _resolve(args.src)
    src = _source(folder)
    holds = TARGET_METHODS.get(args.to)
    if holds is not None and src["method"] not in holds:
        raise CommandError(
            f"the {args.to} format cannot hold a {src['method']!r} adapter ({str(folder)!r}); it holds "
            f"{', '.join(holds)}; convert to {' or '.join(_alternatives(args.to, src['format']))} instead"
        )
    base = args.model or src["base"]
    if not base:
        raise CommandError(
            f"{str(folder)!r} ({src['format']}) does not record its base model; pass --model MODEL"
        )
    want_head = src["has_head"] and not args.no_head
    cls_name = args.model_class or (src["head_class"] if want_head else None)
    if want_head and not cls_name:
        raise CommandError(
            f"{str(folder)!r} has a prediction head but records no model class to load it into; pass "
            "--model-class (e.g. BertForSequenceClassification) and --num-labels, or --no-head"
        )
    next(steps, None)
    model = _load_model(base, cls_name, args.num_labels or (src["num_labels"] if want_head else None))
    next(steps, None)
    name = fxadapt.load_adapter(model, folder, args.name, load_head=want_head)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        fxadapt.save_adapter(model, tmp, name, with_head=want_head, format=args.to)
        _commit_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    next(steps, None)
    note = " with its head" if want_head else ""
    if src["has_head"] and args.no_head:
        note = " (head not converted: --no-head)"
    print(f"converted {src['format']} adapter {name!r} ({src['method']}){note} to {args.to}: {dst}")
    return EXIT_OK


def _tensor_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def _count(folder: Path, fmt: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(adapter tensor shapes, head tensor shapes) by key, read from the checkpoint's files."""
    from .formats import read_tensors

    heads = {"head_model.safetensors", "pytorch_model_head.bin", "model_head.safetensors"}
    adapter: dict[str, tuple[int, ...]] = {}
    head: dict[str, tuple[int, ...]] = {}
    if fmt == "adapterhub":
        pairs = [("adapter.safetensors", "pytorch_adapter.bin", adapter)]
        if (folder / "head_config.json").is_file():
            pairs.append(("model_head.safetensors", "pytorch_model_head.bin", head))
        for safe, pickled, into in pairs:
            into.update({k: tuple(v.shape) for k, v in read_tensors(folder, safe, pickled).items()})
        return adapter, head
    modules_to_save = ()
    if fmt == "peft":
        modules_to_save = tuple(_read_meta(folder).get("modules_to_save") or ())
    for path in _tensor_files(folder):
        if path.suffix != ".safetensors":
            continue
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        for key, shape in shapes.items():
            stripped = key.removeprefix("base_model.model.")
            is_head = path.name in heads or any(
                stripped == m or stripped.startswith(f"{m}.") for m in modules_to_save
            )
            (head if is_head else adapter)[key] = shape
    return adapter, head


def _sites_summary(src: dict[str, Any], keys: list[str]) -> list[str]:
    import re

    meta = src["meta"]
    if src["format"] == "fxadapt":
        by_kinds: dict[tuple[str, ...], list[int]] = {}
        for layer, kinds in sorted((meta.get("sites") or {}).items(), key=lambda kv: int(kv[0])):
            by_kinds.setdefault(tuple(kinds), []).append(int(layer))
        return [f"{', '.join(kinds)} in layers {_ranges(layers)}" for kinds, layers in by_kinds.items()]
    # peer formats: module paths with the layer index collapsed (encoder.layer.*.attention.self.query ×6)
    modules: dict[str, set[str]] = {}
    for key in keys:
        path = key.removeprefix("base_model.model.")
        path = re.sub(r"\.(lora_[AB]|ia3_l)(\.[^.]+)?$", "", path)  # PEFT
        path = re.sub(r"\.(adapters|loras|adapter_fusion_layer)\..*$", "", path)  # AdapterHub
        match = re.search(r"\.(\d+)\.", path)
        pattern, index = (
            (path[: match.start()] + ".*." + path[match.end() :], match.group(1)) if match else (path, "")
        )
        modules.setdefault(pattern, set()).add(index)
    return [f"{p} ×{len(i)}" if len(i) > 1 else p for p, i in sorted(modules.items())]


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}–{v}")
            start = None
    return ", ".join(out)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


# the config fields `info` prints (all of them with --json)
_SHOWN = (
    "r",
    "alpha",
    "lora_alpha",
    "use_rslora",
    "composition_mode",
    "target_modules",
    "attn_matrices",
    "sites",
    "reduction_factor",
    "non_linearity",
    "is_parallel",
    "original_ln_before",
    "scaling",
    "prefix_length",
    "leave_out",
)


def _info(args: argparse.Namespace) -> int:
    import math

    folder = _resolve(args.checkpoint)
    src = _source(folder)
    adapter, head = _count(folder, src["format"])
    meta = src["meta"]
    n_adapter = sum(math.prod(s) for s in adapter.values())
    n_head = sum(math.prod(s) for s in head.values())
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if src["format"] == "fxadapt":
        config = meta.get("config") or {}
        base_info = meta.get("base_model") or {}
        base = ", ".join(
            f"{k}={base_info[k]}"
            for k in ("architecture", "model_type", "hidden_size", "num_layers", "name_or_path")
            if base_info.get(k)
        )
        details = {k: v for k, v in config.items() if k != "method"}
    elif src["format"] == "peft":
        base = f"{meta.get('base_model_name_or_path')}"
        details = {k: meta[k] for k in ("r", "lora_alpha", "use_rslora", "target_modules") if k in meta}
    else:
        base = ", ".join(
            f"{k}={meta[k]}"
            for k in ("model_class", "model_type", "hidden_size", "model_name")
            if meta.get(k)
        )
        details = (
            meta.get("config") if isinstance(meta.get("config"), dict) else {"config": meta.get("config")}
        )
    report = {
        "checkpoint": str(folder),
        "format": src["format"],
        "name": meta.get("name"),
        "method": src["method"],
        "config": details,
        "base_model": base,
        "sites": _sites_summary(src, list(adapter)),
        "adapter_parameters": n_adapter,
        "head_parameters": n_head,
        "files": len(files),
        "size_bytes": size,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    shown = ", ".join(f"{k}={details[k]}" for k in _SHOWN if details.get(k) not in (None, [], {}, ""))
    lines = [
        f"checkpoint:  {folder}",
        f"format:      {src['format']}" + (f" (adapter {meta.get('name')!r})" if meta.get("name") else ""),
        f"method:      {src['method']}" + (f": {shown}" if shown else ""),
        f"base model:  {base or 'not recorded'}",
        "sites:       " + ("\n             ".join(report["sites"]) or "none recorded"),
        f"parameters:  {n_adapter:,} adapter" + (f" + {n_head:,} head" if n_head else ""),
        f"size:        {_human(size)} in {len(files)} file{'s' if len(files) != 1 else ''}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def bench_script() -> Path | None:
    """``bench/models.py`` of the source checkout this fxadapt runs from, or None for an installed wheel."""
    import fxadapt

    script = Path(fxadapt.__file__).resolve().parents[1] / "bench" / "models.py"
    return script if script.is_file() else None


def _bench(args: argparse.Namespace) -> int:
    import runpy

    script = bench_script()
    if script is None:
        raise CommandError(
            "the CPU model benchmark is bench/models.py of the source checkout, which this installation "
            "does not include; clone the repository, `pip install -e .` there, and run `fxadapt bench` again"
        )
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(script.parent))  # as when the script is run directly (it imports bench/machine.py)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # argparse's --help / usage errors inside the script
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_ERROR)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
