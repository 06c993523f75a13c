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
# What a flag left unset means where no default value says it.
UNSET = {"model": "required, here or in --config", "data": "required, here or in --config",
         "resume_adapter_file": "default: none, a fresh start", "config": "default: none",
         "report_to": "default: none; not supported here", "project_name": "default: none, unused without --report-to",
         "alpha": "default: none, --scale applies", "image_budget": "default: the checkpoint's processor setting",
         "video_budget": "default: the checkpoint's processor setting"}


def build_parser() -> ArgumentParser:
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.lora import build_parser as mlx_lm_parser

    from .memory import human, mac_budget

    p = ArgumentParser(prog="python -m mlx_gemma.lora", parents=[mlx_lm_parser()], conflict_handler="resolve",
                       description="LoRA / DoRA fine-tuning of Gemma 4 (QLoRA on a quantized model), on "
                                   "text, image, audio and video examples. Flags as mlx_lm.lora's.")
    p.add_argument("--iters", type=int, help="iterations to train for; with --resume-adapter-file the total, "
                                             "counting the resumed ones (mlx-lm's --iters counts more)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --adapter-path folder, only if mlx-gemma wrote it")
    p.add_argument("--rank", type=int, help="LoRA rank (lora_parameters.rank)")
    p.add_argument("--scale", type=float, help="LoRA scale (lora_parameters.scale)")
    p.add_argument("--alpha", type=float, help="PEFT's lora_alpha: sets scale = alpha / rank")
    p.add_argument("--dropout", type=float, help="LoRA dropout (lora_parameters.dropout)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="activation dtype (auto: float32 for a quantized model on the CPU backend, else as stored)")
    p.add_argument("--plan", action="store_true", help="print the training memory plan and exit")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory the run may use (default: what the GPU may use, Metal's recommended working set on "
                        f"a Mac, {human(mac_budget(16))} on a 16 GB one; physical memory elsewhere)")
    p.add_argument("--image-budget", type=int, default=None, help="soft tokens per image (70..1120)")
    p.add_argument("--video-budget", type=int, default=None, help="soft tokens per video frame")
    # Flags are unset (None) so that a --config file can fill them; --help shows what applies then.
    defaults = {**CONFIG_DEFAULTS, **CONFIG_DEFAULTS["lora_parameters"], **OURS}
    for action in p._actions:
        if action.default is None and "(default" not in action.help:
            action.help += f" ({UNSET[action.dest]})" if defaults.get(action.dest) is None \
                else f" (default: {defaults[action.dest]})"
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
    from .generation import check_sampling

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
    if not isinstance(args["learning_rate"], (int, float)) or not 0 < args["learning_rate"] < math.inf:
        raise InputError(f"--learning-rate must be a finite positive number, got {args['learning_rate']!r}")
    check_sampling(seed=args["seed"])


def run(args) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

    from .loading import load, resolve_model_path
    from .prompt import MediaOptions
    from .tuning import budget, checkpoints, data, trainer

    path = resolve_model_path(args.model)
    plan = budget.training_plan(path, args)
    if args.plan:
        print(plan.table())
        return
    if not plan.fits:
        raise InputError(budget.refusal(plan))
    mx.random.seed(args.seed)
    if args.train:  # every output is checked before minutes of loading and training
        resumed = checkpoints.read_resumed(Path(args.resume_adapter_file)) if args.resume_adapter_file else None
        start = resumed.iteration if resumed else 0
        if start >= args.iters:
            raise InputError(f"{args.resume_adapter_file}: already at iteration {start}, not below --iters "
                             f"{args.iters} (the total here, where mlx-lm's --iters counts more)")
        output = checkpoints.Output(Path(args.adapter_path).expanduser(), args.force, resumed,
                                    trainer.save_points(start, args.iters, args.save_every))
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
        history = []
        if resumed:
            checkpoints.resume(model, resumed)
            history = [trainer.Report(it, train_loss=t, val_loss=v) for it, t, v in resumed.losses]
            print(f"Resuming from {resumed.path} at iteration {start}: --iters {args.iters} is the total, so "
                  f"iterations {start + 1} to {args.iters} follow (mlx-lm's --iters would count more)")
        print(f"Trainable parameters: {trainer.trainable_count(model) / 1e6:.3f}M")
        out = output.folder
        config = checkpoints.adapter_config(vars(args))

        def report(r: trainer.Report) -> None:
            print(r.line(), flush=True)
            history.append(r)

        def save(it: int) -> None:
            output.save(model, config, it, history)
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
        trainer.train(model, opt, train_set, valid_set, train_args, save=save, start=start, seed=args.seed,
                      report=report)
    if args.test:
        value = trainer.evaluate(model, test_set, args.batch_size, args.test_batches)
        print(f"Test loss {value:.3f}, Test ppl {math.exp(min(value, 700.0)):.3f}.")


def main(argv: Optional[list] = None) -> None:
    run_cli(lambda: run(resolve_args(argv)), "interrupted: the last saved adapters are intact")


if __name__ == "__main__":
    main()
