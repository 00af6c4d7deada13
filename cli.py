"""The command-line plumbing train.py, evaluate.py, predict.py, data.py and demo.py share: argument types that
name the flag and the value they refuse, the data, device and picture options, the device and precision rule,
the log line, and guard(), which turns bad input into one line on stderr and exit status 2.

Library code raises plain exceptions (ValueError, data.DataError, inpformer.WeightsError, OSError) with
one-line messages; each script's `if __name__ == "__main__": cli.guard(main)` prints them. Not a script.
"""
import argparse
import contextlib
import math
import os
import re
import sys

import torch

import data

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # see resolve_precision


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ValueError (one line, exit 2 through guard) instead of printing
    the usage text and exiting by itself."""

    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def script_parser(doc) -> Parser:
    """The parser of a script whose docstring opens with a one-paragraph summary followed by its examples: --help
    shows the summary first and the examples last."""
    summary, examples = doc.split("\n\n")[:2]
    return Parser(description=summary, epilog="examples:\n" + examples,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def number(kind=int, low=1):
    """An argparse type: a whole number of at least `low`, or (kind=float) a finite number above `low`."""
    def parse(text):
        with contextlib.suppress(ValueError):
            value = kind(text)
            if kind is int and value >= low:
                return value
            if kind is float and math.isfinite(value) and value > low:
                return value
        wanted = f"a whole number of at least {low}" if kind is int else f"a number above {low}"
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    return parse


def size(word):
    """An argparse type for sizes: "N" (N x N), "HxW" (H rows high, W wide), or the one `word` (none, native)."""
    def parse(text):
        if text.strip().lower() == word:
            return word
        with contextlib.suppress(ValueError):
            parts = [int(p) for p in text.lower().split("x")]
            if len(parts) in (1, 2) and all(p >= 1 for p in parts):
                return (parts[0], parts[-1])
        raise argparse.ArgumentTypeError(f"{text!r} is not N, HxW (e.g. 350x140: 350 rows high, 140 wide) or {word}")
    return parse


def tile_size(text):
    """An argparse type: a whole number of at least 1, or none."""
    if text.strip().lower() == "none":
        return "none"
    return number()(text)


def fraction(text):
    """An argparse type: a number from 0 up to (not including) 1."""
    with contextlib.suppress(ValueError):
        value = float(text)
        if 0.0 <= value < 1.0:
            return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 up to 1 (1 excluded)")


def names_of(known):
    """An argparse type: a comma list of names, each one of `known` (e.g. data.DATASETS)."""
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            shown = ", ".join(map(repr, unknown)) or repr(text)
            raise argparse.ArgumentTypeError(f"unknown data set {shown} (known: {', '.join(known)})")
        return ",".join(names)
    return parse


def add_data_args(parser, datasets, required=False, defaults=None):
    """The data, size and device options of the scripts; `datasets` are the data set names --data knows. Their
    defaults are None here: each script fills them in (train.py from the recipe, evaluate.py and predict.py from
    the checkpoint) and says so in `defaults`, {option: its --help text}; unnamed options read "default: the
    checkpoint's"."""
    defaults = {"workers": "up to 4, at most the CPUs", **(defaults or {})}

    def default(option):
        text = defaults.get(option, "the checkpoint's")
        return f"(default: {text})"

    g = parser.add_argument_group("data and device")
    g.add_argument("--data", type=names_of(datasets), required=required,
                   help=f"data set: {', '.join(datasets)}, or a comma list of them {default('data')}")
    g.add_argument("--data-root", help="folder holding the data set (a comma list, one per --data; demo: demo_data/)")
    g.add_argument("--classes", help=defaults.get("classes help", f'"all" or a comma list of class names '
                                                                   f'{default("classes")}'))
    g.add_argument("--image-size", type=size("native"), metavar="N|HxW|native",
                   help="the resize of every frame: N x N, or H rows x W columns (frames of other shapes are stretched "
                        "to it); native: each frame's own size, with --tile " + default("image-size"))
    g.add_argument("--crop-size", type=size("none"), metavar="N|HxW|none",
                   help="the centre crop of the resized frame fed to the model, a multiple of the patch size 14 (the "
                        "paper's protocol); none: the whole frame " + default("crop-size"))
    g.add_argument("--tile", type=tile_size, metavar="N|none",
                   help="cover each resized frame with N x N tiles (a multiple of 14; --crop-size none is implied), "
                        "each scored on its own, their maps averaged where they overlap; none: no tiles "
                        + default("tile"))
    g.add_argument("--tile-overlap", type=fraction, metavar="F",
                   help="the fraction of a tile neighbouring tiles share, 0 <= F < 1 " + default("tile-overlap"))
    g.add_argument("--bit-depth", type=number(), metavar="N",
                   help="significant bits of 16-bit and float grey images (e.g. 12); their values are divided by "
                        "2^N - 1 (default: 16 for integer images; float images must lie in [0, 1]) "
                        + default("bit-depth"))
    g.add_argument("--batch-size", type=number(), help=f"images per batch {default('batch-size')}")
    g.add_argument("--workers", type=number(low=0), help=f"data-loading processes {default('workers')}")
    g.add_argument("--device", default="auto", help='"auto" (default: cuda if available, else cpu), "cpu", "cuda", '
                                                    '"cuda:1"')
    g.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="the model's dtype (auto: fp32, the official recipe; bf16 is opt-in, also on CPUs with bf16 "
                        "units; fp16 on CUDA only). Maps, scores and losses stay fp32.")


def add_picture_args(parser):
    """--heat-range and --outline: how evaluate.py's and predict.py's pictures are coloured (scoring.PictureStyle)."""
    parser.add_argument("--heat-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="colour heat maps on this range (default: the calibration's; without one, min..max over "
                             "the images drawn)")
    parser.add_argument("--outline", action="store_true",
                        help="draw the edge of the region above the calibrated pixel threshold on pictures")


def geometry(args, base) -> data.ResizeCrop:
    """`base` (the recipe's or the checkpoint's geometry) with the sizes the command line gives; --tile without
    --crop-size means the whole frame. Not yet checked against a patch size."""
    changes = {}
    if args.image_size is not None:
        changes["image_size"] = None if args.image_size == "native" else args.image_size
    if args.crop_size is not None:
        changes["crop_size"] = None if args.crop_size == "none" else args.crop_size
    if args.tile == "none":
        changes["tile"] = None
    elif args.tile is not None:
        changes["tile"] = args.tile
        changes.setdefault("crop_size", None)
    if args.tile_overlap is not None:
        changes["tile_overlap"] = args.tile_overlap
    if args.bit_depth is not None:
        changes["bit_depth"] = args.bit_depth
    geometry = data.geometry_of({**base.to_dict(), **changes})
    if args.tile_overlap is not None and geometry.tile is None:
        raise ValueError(f"--tile-overlap {args.tile_overlap}: the overlap of tiles, with --tile N")
    return geometry


def check_picture_args(args):
    if args.heat_range and not args.heat_range[0] < args.heat_range[1]:
        raise ValueError(f"--heat-range {' '.join(map(str, args.heat_range))}: LO must be below HI")


def log(message):
    """A log line on stdout, at once (a pipe would otherwise hold it back until the run ends)."""
    print(message, flush=True)


def resolve_precision(precision, device) -> str:
    """"auto" is fp32, as the official code trains and evaluates; bf16 and fp16 are opt-in. fp16 needs CUDA
    (CPUs have no fast fp16 matrix products; bf16 runs on CPUs with bf16 units such as AVX512-BF16 or AMX)."""
    name = "fp32" if precision in (None, "auto") else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("--precision fp16 runs on CUDA only (use bf16 on a CPU)")
    return name


def device(name) -> torch.device:
    """"auto" (or None): the first CUDA device when there is one, else the CPU; anything else must name a device
    that is here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if (dev.index or 0) >= count:
            raise ValueError(f"--device {name}: only {count} CUDA device(s) here")
    return dev


def device_and_precision(args) -> tuple[torch.device, str]:
    """The device --device names and the precision --precision resolves to there (resolve_precision)."""
    dev = device(args.device)
    return dev, resolve_precision(args.precision, dev)


def workers(asked=None, default=4) -> int:
    """Loader processes: as asked, else up to `default`; never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(default if asked is None else asked, cpus)


def format_time(seconds) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def one_line(exc: BaseException) -> str:
    """The one-line message of `exc`, also when a DataLoader worker re-raised it with the worker's whole
    traceback as the message: the original message is its last line, after the exception's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) == 1:
        return lines[0]
    return re.sub(r"^(?:[\w.]+\.)?DataError: ", "", lines[-1])


def guard(main) -> None:
    """Run main(); bad input (a ValueError such as data.DataError or inpformer.WeightsError, or an OSError) ends
    with one line "error: ..." on stderr and exit status 2. INPFORMER_TRACEBACK=1 shows the traceback instead."""
    try:
        rc = main()
        sys.exit(rc if isinstance(rc, int) else 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        if os.environ.get("INPFORMER_TRACEBACK"):
            raise
        if isinstance(e, torch.cuda.OutOfMemoryError):
            message = "out of GPU memory; lower --batch-size"
        else:
            message = one_line(e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)
