"""`python -m mlx_gemma.lora --model M --train --data DIR`: LoRA / DoRA / QLoRA fine-tuning.

The flags, YAML `--config` and defaults are mlx-lm's `mlx_lm.lora` (taken from it, not
copied), plus `--rank/--scale/--alpha/--dropout` for the LoRA parameters, `--plan` and
`--memory-limit` for the training memory plan, and the media budgets. The model has no
encoders, so one pass through the decoder's adapters trains on text, image, audio and video
examples alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .backend import DTYPES
from .errors import ArgumentParser, InputError, run_cli

# mlx-lm's defaults where it has them; a local data directory and a model are required here.
OURS = {"model": None, "data": None, "num_layers": 16}
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "muon": "Muon", "sgd": "SGD", "adafactor": "Adafactor"}
UNSUPPORTED = {"report_to": "--report-to (wandb / swanlab)", "trust_remote_code": "--trust-remote-code"}


def build_parser() -> ArgumentParser:
    from mlx_lm.lora import build_parser as mlx_lm_parser

    from .memory import human, mac_budget

    p = ArgumentParser(prog="python -m mlx_gemma.lora", parents=[mlx_lm_parser()], conflict_handler="resolve",
                       description="LoRA / DoRA fine-tuning of Gemma 4 (QLoRA on a quantized model), on "
                                   "text, image, audio and video examples. Flags as mlx_lm.lora's.")
    p.add_argument("--rank", type=int, help="LoRA rank (lora_parameters.rank; default 8)")
    p.add_argument("--scale", type=float, help="LoRA scale (lora_parameters.scale; default 20.0)")
    p.add_argument("--alpha", type=float, help="PEFT's lora_alpha: sets scale = alpha / rank")
    p.add_argument("--dropout", type=float, help="LoRA dropout (lora_parameters.dropout; default 0.0)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="activation dtype (auto: float32 for a quantized model on the CPU backend, else as stored)")
    p.add_argument("--plan", action="store_true", help="print the training memory plan and exit")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory the run may use (default: what the GPU may use, Metal's recommended working set on "
                        f"a Mac, {human(mac_budget(16))} on a 16 GB one; physical memory elsewhere)")
    p.add_argument("--image-budget", type=int, default=None, help="soft tokens per image (70..1120)")
    p.add_argument("--video-budget", type=int, default=None, help="soft tokens per video frame")
    return p


def resolve_args(argv: Optional[list] = None):
    """Flags over the YAML config over mlx-lm's defaults (mlx_lm.lora's order)."""
    import types

    import yaml
    from mlx_lm.lora import CONFIG_DEFAULTS, yaml_loader

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["config"]:
        path = Path(args["config"])
        try:
            config = yaml.load(path.read_text(), yaml_loader)
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"{path}: cannot read the YAML config ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise InputError(f"{path}: the YAML config is not a mapping of option: value")
        unknown = sorted(set(config) - set(CONFIG_DEFAULTS) - set(args))
        if unknown:
            raise InputError(f"{path}: unknown options {', '.join(unknown)}")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in {**CONFIG_DEFAULTS, **OURS}.items():
        if args.get(k) is None:
            args[k] = v
    lora = dict(args["lora_parameters"])
    for k in ("rank", "scale", "dropout"):
        if args[k] is not None:
            lora[k] = args[k]
    if args["alpha"] is not None:
        lora["scale"] = args["alpha"] / lora["rank"]
    args["lora_parameters"] = lora
    check_args(args)
    return types.SimpleNamespace(**args)


def check_args(args: dict) -> None:
    for key, flag in UNSUPPORTED.items():
        if args.get(key):
            raise InputError(f"{flag} is not supported by mlx_gemma.lora")
    if args["fine_tune_type"] not in ("lora", "dora"):
        raise InputError(f"--fine-tune-type {args['fine_tune_type']}: only lora and dora (the base stays frozen, "
                         "quantized or not)")
    if str(args["optimizer"]).lower() not in OPTIMIZERS:
        raise InputError(f"optimizer {args['optimizer']!r}: use one of {', '.join(OPTIMIZERS)}")
    if not args["model"]:
        raise InputError("--model is required (a local checkpoint directory or a Hub id)")
    if not (args["train"] or args["test"] or args["plan"]):
        raise InputError("give --train, --test or --plan")
    if args["data"] is None or not Path(args["data"]).is_dir():
        if not args["plan"] or args["data"] is not None:
            raise InputError(f"--data {args['data']}: not a directory with train.jsonl / valid.jsonl / test.jsonl")
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length",
                 "grad_accumulation_steps"):
        if not isinstance(args[name], int) or args[name] < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {args[name]!r}")
    rank, scale, dropout = (args["lora_parameters"].get(k) for k in ("rank", "scale", "dropout"))
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"--rank must be a positive integer, got {rank!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"--scale must be a finite number, got {scale!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InputError(f"--dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(args["learning_rate"], (int, float)) or not args["learning_rate"] > 0:
        raise InputError(f"--learning-rate must be a positive number, got {args['learning_rate']!r}")


def run(args) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

    from .loading import load, resolve_model_path
    from .prompt import MediaOptions
    from .tuning import budget, checkpoints, data, trainer
    from .tuning.curve import plot_losses

    path = resolve_model_path(args.model)
    plan = budget.training_plan(path, args)
    if args.plan:
        print(plan.table())
        return
    if not plan.fits:
        raise InputError(budget.refusal(plan))
    mx.random.seed(args.seed)
    # --test alone evaluates the adapters at --adapter-path when there are any (mlx-lm does too)
    evaluated = None if args.train or not args.adapter_path or not Path(args.adapter_path).exists() \
        else args.adapter_path
    model, processor = load(path, dtype=args.dtype, progress=True, adapter_path=evaluated)
    options = MediaOptions(image_budget=args.image_budget, video_budget=args.video_budget)
    train_set, valid_set, test_set = data.load_datasets(Path(args.data), processor, mask_prompt=args.mask_prompt,
                                                        max_seq_length=args.max_seq_length, options=options,
                                                        test=args.test, train=args.train)
    if args.train:
        if len(train_set) < args.batch_size:
            raise InputError(f"{args.data}/train.jsonl: {len(train_set)} examples, fewer than --batch-size "
                             f"{args.batch_size}")
        model.freeze()
        linear_to_lora_layers(model, args.num_layers, args.lora_parameters, use_dora=args.fine_tune_type == "dora")
        start = 0
        if args.resume_adapter_file:
            start = checkpoints.resume(model, Path(args.resume_adapter_file))
            print(f"Resuming from {args.resume_adapter_file} at iteration {start}")
        if start >= args.iters:
            raise InputError(f"{args.resume_adapter_file}: already at iteration {start}, not below --iters "
                             f"{args.iters}")
        print(f"Trainable parameters: {trainer.trainable_count(model) / 1e6:.3f}M")
        out = Path(args.adapter_path)
        config = checkpoints.adapter_config(vars(args))

        def save(it: int) -> None:
            checkpoints.save(model, out, config, it)
            print(f"Iter {it}: Saved adapter weights to {out / checkpoints.ADAPTER_FILE} and "
                  f"{out / checkpoints.checkpoint_name(it)}.", flush=True)

        lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
        opt = getattr(optim, OPTIMIZERS[args.optimizer.lower()])(
            learning_rate=lr, **args.optimizer_config.get(args.optimizer.lower(), {}))
        opt.init(model.trainable_parameters())
        opt.state["step"] = mx.array(start, mx.uint64)  # the schedule continues where it stopped
        train_args = TrainingArgs(batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches,
                                  steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
                                  steps_per_save=args.save_every, max_seq_length=args.max_seq_length,
                                  grad_checkpoint=bool(args.grad_checkpoint),
                                  grad_accumulation_steps=args.grad_accumulation_steps)
        reports = trainer.train(model, opt, train_set, valid_set, train_args, save=save, start=start, seed=args.seed)
        plot_losses(reports, out / "loss_curve.png")
    if args.test:
        value = trainer.evaluate(model, test_set, args.batch_size, args.test_batches)
        print(f"Test loss {value:.3f}, Test ppl {math.exp(min(value, 700.0)):.3f}.")


def main(argv: Optional[list] = None) -> None:
    run_cli(lambda: run(resolve_args(argv)), "interrupted: the last saved adapters are intact")


if __name__ == "__main__":
    main()
