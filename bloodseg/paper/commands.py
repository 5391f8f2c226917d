"""What the paper's ``bloodseg`` commands do: ``train-bccd``, ``tune-cleanup``, ``bench``,
``reproduce`` and the ``ddp-bench`` / ``ddp-gradcheck`` workers that :mod:`.ddp_scaling` launches
under torchrun. :mod:`bloodseg.cli` parses the command line and calls these; each imports the
experiment module it runs when it runs (they pull in pandas and the plotting code, which
``bloodseg predict`` does not need). ``bloodseg record`` goes to each record's own ``run_record``.
"""
from __future__ import annotations

import sys

from ..commands import dump_json, write_json


def cmd_train_bccd(args) -> int:
    """:func:`.bccd.train_bccd_checkpoint` with the recipe :func:`bloodseg.cli.bccd_recipe_from_args` made."""
    from .bccd import train_bccd_checkpoint
    dump_json(train_bccd_checkpoint(args.out, args.recipe, src=args.src, pretrain=not args.no_pretrain,
                                    init=args.init, log=lambda m: print(m, flush=True)))
    return 0


def cmd_tune_cleanup(args) -> int:
    from .bccd import tune_checkpoint_cleanup
    result = tune_checkpoint_cleanup(args.ckpt, src=args.src, out=args.out, work=args.work,
                                     log=lambda m: print(m, flush=True))
    print(f"wrote {result['checkpoint']} with postprocess {result['tuning']['chosen']}")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce
    reproduce(args.experiment, scale=args.scale, seeds=args.seeds, max_minutes=args.max_minutes,
              out=args.out, progress=True if args.progress else None, models=args.models)
    return 0


def cmd_bench(args) -> int:
    from .bench import format_bench, run_bench
    result = run_bench(models=args.models, width=args.width, size=args.size, n_images=args.n_images,
                       batch=args.batch, device=args.device, ckpt_dir=args.ckpt_dir,
                       train=not args.no_train, adjoint=not args.no_adjoint, repeats=args.repeats,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
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
