"""Real-photograph recipes (``Recipe.real``) replace the old ``RealPlan`` / ``REAL_PLANS`` /
``CPU_PLAN`` of bloodseg.paper.bccd with nothing changed: the same settings, the same splits,
the same ``train-bccd`` defaults, and the old records and checkpoints still read."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

import bloodseg
from bloodseg import cli
from bloodseg.checkpoint import load_checkpoint
from bloodseg.errors import BloodsegError
from bloodseg.paper import bccd as rd
from bloodseg.recipe import REAL_PRESETS, Recipe, RealDataRecipe, get_recipe, real_recipe

RESULTS = Path(__file__).resolve().parents[1] / "book" / "results"

# The old presets, as the RealPlan dataclass held them before the recipe replaced it (commit f95ffc1,
# bloodseg/paper/bccd.py: REAL_PLANS and CPU_PLAN), written out field by field.
_SIZES = {"pretrain_size": [240, 320], "count_size": [480, 640], "stain": 0.0}
OLD_PLANS = {
    "smoke": {"name": "smoke", "width": 8, "scale": 0.5, "patch": 64, "crops_per_image": 1, "augment": 1,
              "val_images": 2, "epochs": 1, "batch_size": 8, "lr": 3e-3, "finetune_lr": 2e-3, "pretrain_smears": 2,
              "pretrain_crops": 2, "pretrain_epochs": 1, "eval_images": 2, "count_smears": 2,
              **_SIZES, "count_size": [160, 240]},
    "quick": {"name": "quick", "width": 8, "scale": 0.5, "patch": 128, "crops_per_image": 1, "augment": 1,
              "val_images": 24, "epochs": 3, "batch_size": 8, "lr": 2e-3, "finetune_lr": 1e-3, "pretrain_smears": 10,
              "pretrain_crops": 4, "pretrain_epochs": 2, "eval_images": 24, "count_smears": 6,
              **_SIZES, "count_size": [360, 480]},
    "full": {"name": "full", "width": 32, "scale": 0.5, "patch": 128, "crops_per_image": 2, "augment": 4,
             "val_images": None, "epochs": 30, "batch_size": 8, "lr": 1e-3, "finetune_lr": 5e-4, "pretrain_smears": 50,
             "pretrain_crops": 4, "pretrain_epochs": 10, "eval_images": None, "count_smears": 20, **_SIZES},
    "ship": {"name": "ship", "width": 8, "scale": 0.5, "patch": 128, "crops_per_image": 4, "augment": 1,
             "val_images": 40, "epochs": 5, "batch_size": 8, "lr": 2e-3, "finetune_lr": 1e-3, "pretrain_smears": 16,
             "pretrain_crops": 4, "pretrain_epochs": 2, "eval_images": None, "count_smears": 0, **_SIZES},
}

# sha256 (first 16 hex digits) of every sample's name, image and mask, in order, on the vendored
# BCCD sample: computed with the old RealPlan presets before the change.
OLD_SPLITS = {
    "smoke": {"bccd": {"train": "8:6da9efba26ead280", "val": "2:093a4e4220db5df3", "test": "2:35bc05ede50391ab"},
              "pre": {"train": "2:69fc9c54547456c7", "val": "2:feef3e262f75a79a"}},
    "ship": {"bccd": {"train": "32:aa7a576e0693adaa", "val": "4:c46005300b6b83e3", "test": "4:ebcc369d0a09ba6d"},
             "pre": {"train": "48:823eb368d00bee4b", "val": "16:a1383f50593b2d0e"}},
}


def _as_plan(recipe: Recipe) -> dict:
    """A recipe's values under the old RealPlan field names (bccd.PLAN_FIELDS)."""
    d = recipe.to_dict()
    return {"name": recipe.name, **{k: d[v.partition(".")[0]][v.partition(".")[2]] for k, v in rd.PLAN_FIELDS.items()}}


def _hash(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.image).tobytes())
        h.update(np.ascontiguousarray(s.mask).tobytes())
    return f"{len(samples)}:{h.hexdigest()[:16]}"


@pytest.mark.parametrize("name", list(OLD_PLANS))
def test_presets_hold_the_old_plans_settings(name):
    recipe = real_recipe(name)
    assert _as_plan(recipe) == OLD_PLANS[name]
    assert set(rd.PLAN_FIELDS) == set(OLD_PLANS[name]) - {"name"}            # every old field has one place
    old = rd.recipe_from_plan(OLD_PLANS[name])
    assert old == (recipe.replace(**{"model.name": "unet"}) if name == "ship" else recipe)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_profiles_pick_their_real_recipe(monkeypatch):
    monkeypatch.setenv("BLOODSEG_PROFILE", "smoke")
    assert real_recipe() is REAL_PRESETS["smoke"] and real_recipe(get_recipe("quick")) is REAL_PRESETS["quick"]
    from bloodseg.paper.bccd_records import training_runs
    assert training_runs(real_recipe("full"))[-1] == ("nodes-unet", "scratch")
    assert len(training_runs(real_recipe("quick"))) == 3
    with pytest.raises(BloodsegError, match="unknown profile"):
        real_recipe("nope")


@pytest.mark.parametrize("name", list(OLD_SPLITS))
def test_presets_cut_the_old_splits(name, prepared_bccd):
    recipe = real_recipe(name)
    splits = rd.bccd_splits(prepared_bccd[0], recipe)
    assert {k: _hash(v) for k, v in splits.items()} == OLD_SPLITS[name]["bccd"]
    pre = rd.synthetic_pretraining_splits(recipe)
    assert {k: _hash(pre[k]) for k in ("train", "val")} == OLD_SPLITS[name]["pre"] and not pre["test"]


def test_a_recipe_without_the_real_section_reads_and_writes_as_before():
    d = get_recipe("quick").to_dict()
    assert set(d) == {"name", "data", "model", "train", "measure"}         # fingerprints of older runs hold
    assert Recipe.from_dict(d).real is None
    r = Recipe("x").replace(**{"real.val_images": 3})
    assert r.real == RealDataRecipe(val_images=3) and Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(BloodsegError, match="unknown field"):
        Recipe.from_dict({"name": "x", "real": {"zzz": 1}})


def test_old_records_and_the_shipped_checkpoint_still_read():
    record = json.loads((RESULTS / "08_real_smears" / "record_training.json").read_text())["data"]
    assert "plan" in record and rd.stored_recipe(record) == real_recipe("quick")
    meta = load_checkpoint(bloodseg.shipped_checkpoint())["metrics"]
    shipped = rd.stored_recipe(meta)
    assert (shipped.name, shipped.model.name, shipped.model.width, shipped.data.crops_per_image) == \
        ("cli", "nodes-unet", 16, 8)
    assert (shipped.train.batch_size, shipped.train.schedule, shipped.real.finetune_lr) == (32, "cosine", 5e-4)
    assert rd.stored_recipe({"recipe": shipped.to_dict()}) == shipped


def _bccd_args(*flags):
    args = cli.build_parser().parse_args(["train-bccd", "--src", "s", "--out", "o", *flags])
    return cli.bccd_recipe_from_args(args)


def test_train_bccd_flags_map_onto_the_ship_recipe():
    default = _bccd_args()
    assert default == REAL_PRESETS["ship"].replace("cli")                     # the old CPU_PLAN, named "cli"
    assert _as_plan(default) == {**OLD_PLANS["ship"], "name": "cli"}
    r = _bccd_args("--model", "unet", "--width", "16", "--scale", "0.25", "--patch", "96", "--crops", "8",
                   "--augment", "2", "--val-images", "0", "--stain", "0.5", "--epochs", "7", "--batch-size", "32",
                   "--lr", "0.01", "--finetune-lr", "5e-4", "--pretrain-smears", "50", "--pretrain-epochs", "3",
                   "--schedule", "cosine", "--max-minutes", "6", "--seed", "2")
    assert (r.model.name, r.model.width) == ("unet", 16)
    assert (r.data.scale, r.data.patch, r.data.crops_per_image, r.data.augment, r.data.stain) == (0.25, 96, 8, 2, 0.5)
    assert (r.train.epochs, r.train.batch_size, r.train.lr, r.train.schedule, r.train.max_minutes, r.train.seed) == \
        (7, 32, 0.01, "cosine", 6.0, 2)
    assert (r.real.val_images, r.real.finetune_lr, r.real.pretrain_smears, r.real.pretrain_epochs) == (None, 5e-4, 50, 3)
    for flags, message in ((["--crops", "0"], "--crops must be positive; got 0"),
                           (["--stain", "1.5"], "--stain must be a strength from 0 (off) to 1; got 1.5"),
                           (["--val-images", "-1"], "--val-images must be 0 (all) or positive; got -1"),
                           (["--max-minutes", "-1"], "max_minutes must be 0")):
        with pytest.raises(BloodsegError, match=re.escape(message)):
            _bccd_args(*flags)
