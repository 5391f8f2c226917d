"""What the paper's ``bloodseg`` commands do: ``bench``,
``reproduce`` and the ``ddp-bench`` / ``ddp-gradcheck`` workers that :mod:`.ddp_scaling` launches
under torchrun. :mod:`bloodseg.cli` parses the command line and calls these; each imports the
experiment module it runs when it runs (they pull in pandas and the plotting code, which
``bloodseg predict`` does not need). ``bloodseg record`` goes to each record's own ``run_record``.
"""
from __future__ import annotations

import sys

from ..commands import write_json


def cmd_reproduce(args) -> int:
    if args.experiment == "robust":
        from .robust import reproduce_command
        return reproduce_command(args)
    from .reproduce import reproduce
    reproduce(args.experiment, scale=args.scale, seeds=args.seeds, max_minutes=args.max_minutes,
              out=args.out, progress=True if args.progress else None, models=args.models)
    return 0


def cmd_bench(args) -> int:
    from ..registry import parse_model_options
    from .bench import format_bench, run_bench
    result = run_bench(models=args.models, width=args.width, size=args.size, n_images=args.n_images,
                       batch=args.batch, device=args.device, ckpt_dir=args.ckpt_dir,
                       train=not args.no_train, adjoint=not args.no_adjoint, repeats=args.repeats,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                       options=parse_model_options(getattr(args, "model_option", None)))
    print(format_bench(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_ddp_bench(args) -> int:
    from .ddp_scaling import bench_command
    bench_command(args.model, args.width, args.patch, args.batch_size, args.steps, args.warmup,
                  args.profile, args.bf16, json_path=args.json)
    return 0


def cmd_ddp_gradcheck(args) -> int:
    from .ddp_scaling import gradcheck_command
    gradcheck_command(args.configs, args.width, args.size, args.batch, args.out)
    return 0
