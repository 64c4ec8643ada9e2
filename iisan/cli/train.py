"""Stage two: ``iisan train`` and ``iisan profile``."""

from __future__ import annotations

import json

from iisan.cli.common import add_item_args, item_inputs, json_arg, train_settings


def cmd_train(a):
    from iisan.core.tracking import track_run
    from iisan.train.loop import train

    m = train(a.data, a.out, *train_settings(a), item_inputs(a), extra_meta={"experiment": a.name} if a.name else None)
    print(json.dumps({"valid": m["valid"], "test": m["test"], "best_epoch": m["best_epoch"]}))
    tags = json_arg(a.tags, "tags") if a.tags else {"experiment": a.name or "", "run": a.name or ""}
    track_run(a.out, tags)  # when config.yaml's tracking is on (IISAN_TRACKING); never fails the run


def cmd_profile(a):
    from iisan.core.outputs import atomic_json
    from iisan.train.profiling import profile

    atomic_json(a.out, profile(a.data, *train_settings(a), a.batch_size, a.steps, item_inputs(a)))


def add_commands(sub) -> None:
    s = sub.add_parser("train", help="train and evaluate from caches; writes metrics.json and friends")
    s.add_argument("--data", required=True)
    add_item_args(s)
    s.add_argument("--settings", help="training settings as JSON (inline or @file)")
    s.add_argument("--name", help="experiment name recorded in metrics.json")
    s.add_argument("--tags", help="JSON labels of the run for tracking: dataset, experiment, run, point, seed")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_train, log_to=lambda a: f"{a.out}/train.log")  # every run keeps its log

    s = sub.add_parser("profile", help="time and peak memory of training steps at one batch size (Figure 5)")
    s.add_argument("--data", required=True)
    add_item_args(s)
    s.add_argument("--settings", help="training settings as JSON (inline or @file)")
    s.add_argument("--batch-size", type=int, required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--out", required=True, help="JSON file to write")
    s.set_defaults(func=cmd_profile)
