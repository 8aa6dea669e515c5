"""The command line: ``python -m seemore_ds <command>``. Parses arguments and calls the package."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

from seemore_ds.config_reference import markdown_reference, train_help_epilog, yaml_defaults
from seemore_ds.errors import UserError
from seemore_ds.launching import end_process
from seemore_ds.output_paths import file_in_the_way
from seemore_ds.preemption import Preempted


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as every other bad input is: one ``error:`` line, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would name this function in its message
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _finite_number(text: str, above_zero: bool) -> float:
    """A number above 0, or 0 or more; never NaN or inf, which pass no bound and size or sample nothing."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
        raise argparse.ArgumentTypeError(f"expected a finite number {'above 0' if above_zero else 'of 0 or more'}, "
                                         f"got {text}")
    return value


_positive_number = functools.partial(_finite_number, above_zero=True)
_non_negative_number = functools.partial(_finite_number, above_zero=False)


# Output paths are checked when the arguments are parsed, so that a path that cannot be written stops the
# command before its work (a plan, a dataset) rather than after; missing folders are made when writing.
def _output_file(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file, e.g. {path / 'NAME'}")
    blocker = file_in_the_way(path.parent)
    if blocker:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {blocker} is a file, not a folder")
    return text


def _output_folder(text: str) -> str:
    blocker = file_in_the_way(Path(text))
    if blocker == Path(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; name a folder")
    if blocker:
        raise argparse.ArgumentTypeError(f"cannot make folder {text}: {blocker} is a file, not a folder")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m seemore_ds", description="Train and use the Seemore vision-language model.")
    # The deepspeed launcher passes --local_rank=N before the command; accept it there too.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (engine-free or under DeepSpeed)",
                                description="Train a model: defaults, then --config FILE, then key=value overrides.",
                                epilog=train_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML run config (default: the built-in defaults, as in configs/default.yaml)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")
    train.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                       help="DeepSpeed JSON config (same as train.deepspeed_config=FILE)")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    plan = commands.add_parser("plan", help="ZeRO stage, offload, micro-batch and accumulation that fit your hardware; writes the DeepSpeed JSON")
    plan.add_argument("--config", help="YAML run config (model sizes, caption length, precision, batch)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.precision=bf16")
    plan.add_argument("--nodes", type=_positive_int, default=1)
    plan.add_argument("--gpus-per-node", type=_positive_int, default=1)
    plan.add_argument("--gpu-mem", type=_positive_number, default=80.0, metavar="GIB",
                      help="memory of one GPU (default 80)")
    plan.add_argument("--cpu-mem", type=_positive_number, default=None, metavar="GIB",
                      help="host memory per node (default: this machine's)")
    plan.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: plan CPU ranks on this machine")
    plan.add_argument("--ranks", type=_positive_int, default=None, help="CPU ranks (with --device cpu)")
    plan.add_argument("--global-batch", type=_positive_int, default=None,
                      help="samples per optimizer step over all ranks (default: train.batch_size x train.grad_accum x ranks)")
    plan.add_argument("--out", type=_output_file, help="write the chosen DeepSpeed JSON here")

    generate = commands.add_parser("generate", help="caption images with a trained model")
    generate.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    generate.add_argument("--image", required=True, nargs="+", help="image file(s) in any format PIL reads")
    generate.add_argument("--temperature", type=_non_negative_number, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely characters")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=None)
    generate.add_argument("--seed", type=int, default=0, help="seed for sampling")

    evaluate = commands.add_parser("eval", help="validation loss and caption exact match of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    evaluate.add_argument("--data", help="CSV to evaluate on (default: the run's own held-out split)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)

    export = commands.add_parser("export", help="consolidate a checkpoint (any ZeRO stage) into one fp32 model.safetensors")
    export.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    export.add_argument("--out", required=True, help="output folder, or a path ending in .safetensors")

    checkpoint = commands.add_parser("checkpoint", help="inspect a checkpoint, or convert it to the universal form")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="CHECKPOINT_COMMAND")
    info = checkpoint_commands.add_parser("info", help="step, world size, ZeRO stage, precision, backend, samples seen, size")
    info.add_argument("path", metavar="PATH", help="run folder or checkpoint folder")
    convert = checkpoint_commands.add_parser(
        "convert", help="write a checkpoint's universal form: resumable by either backend at any rank count and stage")
    convert.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    convert.add_argument("--out", required=True, help="new folder for the converted checkpoint")

    plot = commands.add_parser("plot", help="write the PNG plots of a run folder (with captions.png of its latest "
                                           "checkpoint), or overlay several runs")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", type=_output_folder,
                      help="folder for the PNGs (default: the run folder; needed for several runs)")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_commands.add_parser("synth", help="write the built-in synthetic dataset as a seemore CSV")
    synth.add_argument("--out", type=_output_file, required=True, help="CSV file to write")
    synth.add_argument("--n", type=_positive_int, default=1000, help="number of images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=_positive_int, default=64, help="image side in pixels")
    synth.add_argument("--png-dir", type=_output_folder, help="also write every image as a PNG file here")

    reference = commands.add_parser("config-reference", help="print every config key with its default, what it "
                                                              "accepts and what it does (docs/config.md)")
    reference.add_argument("--yaml", action="store_true", help="print configs/default.yaml instead: every default, "
                                                               "described")

    hostfile = commands.add_parser("hostfile", help="hostfiles for deepspeed --hostfile")
    hostfile_commands = hostfile.add_subparsers(dest="hostfile_command", required=True, metavar="HOSTFILE_COMMAND")
    check = hostfile_commands.add_parser("check", help="validate a hostfile as DeepSpeed's launcher reads it")
    check.add_argument("file", help="hostfile: one 'HOST slots=N' line per node, # comments")
    return parser


def cmd_train(args) -> None:
    from seemore_ds.config import load_config
    from seemore_ds.trainer import train

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    train(load_config(args.config, overrides))


def cmd_plan(args) -> None:
    import psutil

    from seemore_ds.config import load_config
    from seemore_ds.plan import run_plan, target_from_args

    cpu_mem = args.cpu_mem if args.cpu_mem is not None else psutil.virtual_memory().total / 2**30
    target = target_from_args(args.nodes, args.gpus_per_node, args.gpu_mem, cpu_mem, args.device, args.ranks)
    print(run_plan(load_config(args.config, args.overrides), target, args.global_batch, args.out))


def cmd_generate(args) -> None:
    import torch

    from seemore_ds.checkpoint import load_model_for_inference
    from seemore_ds.data.images import read_image_file
    from seemore_ds.evaluation import generate_captions

    model, tokenizer, cfg = load_model_for_inference(args.checkpoint)
    images = torch.stack([
        torch.from_numpy(read_image_file(path, cfg.model.img_size, cfg.data.max_image_pixels)) for path in args.image
    ])
    generator = torch.Generator().manual_seed(args.seed)
    captions = generate_captions(model, images, tokenizer, temperature=args.temperature, top_k=args.top_k,
                                 max_new_tokens=args.max_new_tokens, generator=generator)
    for path, caption in zip(args.image, captions):
        print(caption if len(args.image) == 1 else f"{path}\t{caption}")


def cmd_eval(args) -> None:
    from seemore_ds.checkpoint import load_model_for_inference
    from seemore_ds.evaluation import evaluate_checkpoint

    model, tokenizer, cfg = load_model_for_inference(args.checkpoint)
    result = evaluate_checkpoint(model, tokenizer, cfg, args.data, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['source']}: val_loss {result['val_loss']:.4f}, caption_exact_match {result['caption_exact_match']:.3f} "
              f"on {result['n']} rows")
        if result["skipped_rows"]:  # their reasons went to stderr, before the score
            print(f"{result['skipped_rows']} rows skipped as unusable (reasons above)")


def cmd_export(args) -> None:
    from seemore_ds.export import export_checkpoint

    weights = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {weights} (fp32) with config.yaml and tokenizer.json beside it")
    if weights.name != "model.safetensors":
        print(f"note: eval and generate read a folder's model.safetensors; rename {weights.name} or export to a folder")


def cmd_checkpoint(args) -> None:
    from seemore_ds.checkpoint import checkpoint_summary, convert_checkpoint

    if args.checkpoint_command == "info":
        print(checkpoint_summary(args.path))
        return
    out = convert_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}: resume it with train.resume={out} (either backend, any rank count and ZeRO stage)")


def cmd_plot(args) -> None:
    from seemore_ds.metrics.plots import plot_runs

    if len(args.run_dirs) > 1 and not args.out:
        raise UserError(f"plotting {len(args.run_dirs)} runs together needs a folder for the PNGs: add --out DIR")
    out_dir = Path(args.out or args.run_dirs[0])
    for path in plot_runs(args.run_dirs, out_dir):
        print(path)
    if len(args.run_dirs) == 1:
        try:
            print(plot_checkpoint_captions(args.run_dirs[0], out_dir))
        except UserError as err:  # the curves are still worth having without a checkpoint to caption with
            print(f"note: no captions.png: {err}")


def plot_checkpoint_captions(run_dir: str, out_dir: Path) -> Path:
    """captions.png of the run's latest checkpoint on the first images of its held-out split."""
    from seemore_ds.checkpoint import load_model_for_inference
    from seemore_ds.evaluation import held_out_data
    from seemore_ds.metrics.caption_grid import CAPTIONS_FILE
    from seemore_ds.validator import draw_held_out_captions

    model, tokenizer, cfg = load_model_for_inference(run_dir)
    return draw_held_out_captions(model, held_out_data(cfg), tokenizer, out_dir / CAPTIONS_FILE,
                                  f"{Path(run_dir).resolve().name}, latest checkpoint")[-1]


def cmd_data(args) -> None:
    from seemore_ds.data.csv_reader import write_caption_csv
    from seemore_ds.data.synthetic import synthetic_dataset

    images, captions = synthetic_dataset(args.n, seed=args.seed, size_px=args.size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_caption_csv(args.out, images, captions)
    if args.png_dir:
        folder = Path(args.png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        width = len(str(args.n - 1))
        for i, image in enumerate(images):
            image.save(folder / f"{i:0{width}d}.png")
    print(f"wrote {args.n} captioned images to {args.out}" + (f" and PNGs to {args.png_dir}" if args.png_dir else ""))


def cmd_config_reference(args) -> None:
    print(yaml_defaults() if args.yaml else markdown_reference(), end="")


def cmd_hostfile(args) -> None:
    from seemore_ds.hostfile import describe_hosts, read_hostfile

    print(describe_hosts(args.file, read_hostfile(args.file)))


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "generate": cmd_generate, "eval": cmd_eval, "plot": cmd_plot, "data": cmd_data,
            "export": cmd_export, "hostfile": cmd_hostfile, "checkpoint": cmd_checkpoint,
            "config-reference": cmd_config_reference}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`train --config X --deepspeed_config Y key=value`), where
    # argparse alone stops collecting positionals; pick them up from the leftovers.
    args, leftovers = parser.parse_known_args(argv)
    overrides = [arg for arg in leftovers if "=" in arg and not arg.startswith("-")]
    if leftovers and (args.command not in ("train", "plan") or len(overrides) != len(leftovers)):
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        COMMANDS[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:  # a checkpoint was saved; the message (rank 0's) says how to resume
        if str(stop):
            print(str(stop), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class StdoutThatOutlivesItsReader:
    """sys.stdout that, once its reader has gone (``train ... | head``), drops what is printed instead of
    stopping the command with BrokenPipeError: a run is not lost because its console output went unread."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_from_now_on()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_from_now_on()

    def _drop_from_now_on(self) -> None:
        # The recipe of Python's "Note on SIGPIPE": the descriptor points at devnull, so that later writes and
        # the interpreter's last flush of stdout succeed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def console_script() -> None:
    """The ``seemore-ds`` command that ``pip install .`` puts on the PATH."""
    sys.stdout = StdoutThatOutlivesItsReader(sys.stdout)
    end_process(main())


if __name__ == "__main__":
    console_script()
