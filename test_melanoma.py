"""Tests of melanoma.py and ensemble.py: `pytest test_melanoma.py` (about two minutes on 2 CPU cores).

Laid out like the code: the recipe's parts in melanoma.py's order, then each extra in its order below the banner,
then ensemble.py. Tiny timm test models and generated images; ../shared/isic2020 where present. A refusal table
per entry point: each row an input and the words its one-line error must hold.
"""
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import kornia.augmentation as K
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

import ensemble
import melanoma

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "isic2020"
TINY = ("--model", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "2", "--batch-size", "16",
        "--tta", "2", "--num-workers", "0", "--lr-max", "3e-3")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEDGER_ROW = ",".join(ensemble.LEDGER) + "\n2026-01-01 00:00:00,a,0,"  # the ledger's header, a row's start
needs_shared = pytest.mark.skipif(not (SHARED / "train.csv").exists(), reason="../shared/isic2020 is absent")


# ---- Shared fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic competition dataset in the official layout: ~160 training images, 30 test images."""
    return melanoma.make_demo_data(tmp_path_factory.mktemp("data") / "d", n_patients=32, n_test=30, shape=(48, 64))


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of tiny_data that a test may break."""
    return Path(shutil.copytree(tiny_data, tmp_path / "d"))


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """A finished fold 0 of run 'tiny' (one epoch, plain passes: --tta 0) and its output folder."""
    out = tmp_path_factory.mktemp("run")
    melanoma.main(argv(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "tiny"))
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run's folder, for a test that changes it."""
    return Path(shutil.copytree(trained, tmp_path / "out"))


@pytest.fixture(scope="session")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def argv(data, out, *extra):
    """A tiny run's command line on `data` into `out`, as strings."""
    return [str(a) for a in ("--data-dir", data, "--folds", Path(data) / "folds.csv", "--out", out, *TINY, *extra)]


def refused(argv, capsys, *names):
    """melanoma.main in-process: exit code 2 and one stderr line naming each of `names`; the line."""
    with pytest.raises(SystemExit) as e:
        melanoma.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(str(n) in err for n in names), err
    return err


def run_cli(*args, env=None, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def predict(out, *flags, name="tiny"):
    """--predict of run `name` in `out`, in-process: its CSV."""
    melanoma.main(["--predict", *map(str, flags), "--name", name, "--out", str(out), "--num-workers", "0"])
    return pd.read_csv(out / f"{name}_predict.csv")


def seeded(key, fn):
    """fn() with its random draws keyed on `key` (melanoma.seeded), the global generators left alone."""
    with melanoma.seeded(*key):
        return fn()


def net(name="test_efficientnet", **shape):
    """A fresh model as the extras build it (ExtrasNet)."""
    return melanoma.ExtrasNet(melanoma.Net.timm_backbone(name, False), **shape)


def weights_into(model, path, name="test_efficientnet"):
    melanoma.load_weights(model, melanoma.read_weights(path)[0], f"--weights {path}", name)
    return model


def smooth_image(w, h, seed=0):
    small = np.random.default_rng(seed).integers(0, 256, (max(1, h // 50), max(1, w // 50), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def first_image(data, split="train"):
    return next(iter(sorted((data / "jpeg" / split).iterdir())))


def break_csv(data, name, change):
    df = pd.read_csv(data / name, dtype=str, keep_default_na=False)
    change(df).to_csv(data / name, index=False)


def csv_of(path, **cols):
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def made(path, text=None):
    """path, made a folder (text None) or a file holding text."""
    path.mkdir() if text is None else path.write_text(text)
    return path


def is_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (im.format, im.size)
        im.verify()
    return True


def fold_outputs(data, out, name, fold):
    """A finished fold's outputs: every validation image once in the OOF file, every test image once in the test file."""
    train = pd.read_csv(data / "train.csv").merge(pd.read_csv(data / "folds.csv")[["image_name", "fold"]])
    val = train[train["fold"] == fold]
    oof = pd.read_csv(out / f"{name}_fold{fold}_oof.csv")
    assert list(oof.columns) == ["image_name", "target", "pred", "fold"]
    assert sorted(oof["image_name"]) == sorted(val["image_name"]) and oof["image_name"].is_unique
    assert (oof.set_index("image_name")["target"] == val.set_index("image_name")["target"]).all()
    assert (oof["fold"] == fold).all() and oof["pred"].between(0, 1).all() and oof["pred"].nunique() > 1
    test = pd.read_csv(out / f"{name}_fold{fold}_test.csv")
    assert list(test.columns) == ["image_name", "target"] and test["target"].between(0, 1).all()
    assert test["image_name"].tolist() == pd.read_csv(data / "test.csv")["image_name"].tolist()
    info = json.loads((out / f"{name}_fold{fold}.json").read_text())
    assert info["fold"] == fold and len(info["epochs"]) == info["args"]["epochs"]
    assert {"loss", "val_auc", "lr", "images_per_s"} <= set(info["epochs"][0]) and info["wall_s"] > 0
    assert info["oof_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["pred"]))
    assert {"head.weight", "head.3.weight"} & set(load_file(out / f"{name}_fold{fold}.safetensors"))  # linear, mlp
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")) and not list(out.glob("*_last.pt"))
    return oof, test, info


def on_every_epoch(monkeypatch, act):
    """Call act(epoch) after each epoch of training."""
    epoch = melanoma.train_one_epoch
    monkeypatch.setattr(melanoma, "train_one_epoch", lambda *a, **k: (epoch(*a, **k), act(a[7]))[0])


# ---- The recipe: flags ----------------------------------------------------------------------------

def test_the_defaults_are_the_recipe_its_flags_come_first_and_help_shows_them(capsys):
    a = melanoma.get_args(["--data-dir", "x"])
    assert (a.model, a.size, a.epochs, a.lr_min, a.lr_max, a.wd, a.tta, a.pretrained, a.batch_size, a.frac) == \
        ("tf_efficientnet_b5.ns_jft_in1k", 512, 20, 5e-6, 2e-4, 0.1, 15, True, 32, 1.0)
    assert (a.out, a.name, a.neg_ratio, a.cutout) == ("preds", "tf_efficientnet_b5.ns_jft_in1k_512", None, False)
    d = melanoma.get_args(["--demo", "--size", "48"])
    assert d.model == "test_efficientnet" and not d.pretrained and d.size == 48 and d.name == "demo"
    p = melanoma.get_parser()  # the recipe's flags come first; the settings that make a run another are marked
    titles = [g.title for g in p._action_groups[2:]]
    assert titles[:7] == ["data", "sampler", "augmentation", "model", "training", "prediction", "run"]
    settings = {a.dest for a in p.settings}
    assert {"size", "epochs", "lr_max", "tta", "meta", "augs", "cache", "target"} <= settings
    assert not {"fold", "out", "name", "resume", "predict", "num_workers"} & settings
    with pytest.raises(SystemExit):
        melanoma.get_args(["--help"])
    out = capsys.readouterr().out
    assert "/kaggle/input/siim-isic-melanoma-classification" in "".join(out.split())
    assert "{name}_predict_skipped.tsv" in out and "(default: 0.1)" in out and "(default: None)" not in out


# ---- The recipe: the run --------------------------------------------------------------------------

def test_the_recipe_cut_at_its_banner_trains_byte_for_byte(tiny_data, tmp_path):
    """head -n $((B-1)) melanoma.py > recipe.py, beside ensemble.py, writes what melanoma.py writes."""
    lines = (ROOT / "melanoma.py").read_text().splitlines(keepends=True)
    banner = next(i for i, line in enumerate(lines) if line.startswith("# Beyond the recipe"))
    cut = made(tmp_path / "cut")
    (cut / "recipe.py").write_text("".join(lines[:banner]))
    shutil.copy(ROOT / "ensemble.py", cut / "ensemble.py")
    flags = ["--data-dir", str(tiny_data), "--folds", str(tiny_data / "folds.csv"), "--model", "test_efficientnet",
             "--no-pretrained", "--size", "64", "--epochs", "12", "--batch-size", "32", "--lr-max", "2e-3", "--tta",
             "4", "--num-workers", "0", "--fold", "0", "--cpu", "--name", "r"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import recipe, ensemble; "
            "assert ensemble.__file__.startswith(sys.argv[1]); recipe.recipe(sys.argv[2:])")
    done = run_cli("-c", code, cut, *flags, "--out", tmp_path / "B", cwd=cut)
    assert done.returncode == 0, done.stderr[-2000:]
    melanoma.main(flags + ["--out", str(tmp_path / "M")])
    for name in ("r_fold0_oof.csv", "r_fold0_test.csv", "r_fold0.safetensors"):
        assert (tmp_path / "B" / name).read_bytes() == (tmp_path / "M" / name).read_bytes(), name


def test_two_folds_score_as_one_cv_and_a_nan_loss_keeps_the_last_epoch(tiny_data, tmp_path, capsys, data, monkeypatch):
    out = tmp_path / "preds"
    flags = argv(tiny_data, out, "--fold", "0", "1", "--cutout", "--cache", tmp_path / "c", "--frac", "0.6")
    melanoma.main(flags)
    log = capsys.readouterr().out
    folds = pd.read_csv(tiny_data / "folds.csv")
    oofs = []
    for fold in (0, 1):
        oof, _, info = fold_outputs(tiny_data, out, "test_efficientnet_32", fold)
        assert info["n_train"] == round(0.6 * (folds["fold"] != fold).sum()) and f"fold {fold} epoch  2/2  loss" in log
        oofs.append(oof)
    both = pd.concat(oofs)
    assert f"CV AUC over folds 0, 1: {roc_auc_score(both['target'], both['pred']):.4f}" in log
    assert 30 < len(list((tmp_path / "c").iterdir())) <= len(folds) + 30  # each image read is cached once
    melanoma.main(flags[:-4] + ["--fold", "0", "--cutout", "--cache", str(tmp_path / "c"), "--frac", "0.6"])
    again = capsys.readouterr().out
    assert "finished already" in again and "epoch" not in again
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in net().state_dict().items()}, tmp_path / "nan.safetensors")
    refused(argv(data, tmp_path / "out", "--weights", tmp_path / "nan.safetensors"), capsys,
            "loss is nan at epoch 1, step 1", "lower --lr-max")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    ckpt = tmp_path / "later" / "test_efficientnet_32_fold0_last.pt"
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                        lambda *a, **k: bce(*a, **k) * (float("nan") if ckpt.exists() else 1))
    refused(argv(data, tmp_path / "later"), capsys, "loss is nan at epoch 2, step 1", "last good checkpoint kept")
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 1
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]


def test_two_processes_deal_the_sample_score_every_image_once_and_stop_together_on_a_nan(tiny_data, tmp_path):
    out = tmp_path / "preds"
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "melanoma.py",
                *argv(tiny_data, out, "--name", "ddp"), env={"ACCELERATE_USE_CPU": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("fold 0 epoch  1/2") == 1  # only rank 0 prints
    oof, test, info = fold_outputs(tiny_data, out, "ddp", 0)
    assert info["processes"] == 2 and len(oof) % 64 not in (0, 32)  # the last batch is padded, then unpadded
    targets = pd.read_csv(tiny_data / "folds.csv").query("fold != 0")["target"].to_numpy()
    sample = len(melanoma.EpochSampler.indices(targets, melanoma.EpochSampler.per_pool(targets, 2), 0, 0))
    assert [e["images"] for e in info["epochs"]] == [sample, sample]  # the ranks' shares add up to the sample
    assert sorted(p.name for p in out.iterdir()) == [f"ddp_fold0{s}" for s in (
        ".json", ".safetensors", "_curves.png", "_oof.csv", "_roc.png", "_test.csv")] + ["runs.csv"]
    assert len(pd.read_csv(out / "runs.csv")) == 1  # one row, from the main process
    # The others would wait in the gradients' all-reduce for a rank that never comes (10 minutes on GPUs).
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\nsys.path.insert(0, sys.argv[1])\nimport torch, melanoma\n"
        "bce = torch.nn.functional.binary_cross_entropy_with_logits\n"
        "torch.nn.functional.binary_cross_entropy_with_logits = lambda *a, **k: bce(*a, **k) * (\n"
        "    float('nan') if os.environ['RANK'] == '1' else 1)\nmelanoma.main(sys.argv[2:])\n")
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", driver, ROOT,
                *argv(tiny_data, tmp_path / "out", "--epochs", "1"), env={"ACCELERATE_USE_CPU": "1"}, timeout=240)
    assert r.returncode != 0 and r.stderr.count("error: fold 0: ") == 2, r.stderr[-3000:]  # the lines may interleave
    assert "error: fold 0: loss is nan at epoch 1, step 1" in r.stderr
    assert "error: fold 0: loss is not finite on another process at epoch 1, step 1" in r.stderr


# ---- The recipe: data -----------------------------------------------------------------------------

def test_layouts_tables_as_text_and_images_decoded_small_and_upright(tiny_data, tmp_path, capsys, monkeypatch, data):
    for name, images in (("a", "jpeg/train"), ("b", "train")):
        (tmp_path / name / images).mkdir(parents=True)
        (tmp_path / name / "train.csv").write_text("image_name,target\n")
    assert melanoma.layout_of(tmp_path / "a") == (tmp_path / "a/jpeg/train", tmp_path / "a/jpeg/test")
    assert melanoma.layout_of(tmp_path / "b") == (tmp_path / "b/train", tmp_path / "b/test")
    assert melanoma.layout_of(tmp_path) is None
    monkeypatch.chdir(tmp_path)
    made(tmp_path / "data")  # a data/ folder without a competition layout does not count
    err = refused(TINY, capsys, "no competition data found in data or /kaggle/input/", "--demo",
                  "kaggle competitions download -c siim-isic-melanoma-classification", "--data-dir")
    assert not (tmp_path / "preds").exists() and err
    (tmp_path / "data").rmdir()
    shutil.copytree(tiny_data, tmp_path / "data")
    melanoma.main([*TINY, "--epochs", "1", "--fold", "1"])
    assert capsys.readouterr().out.splitlines()[0].startswith("data: data (the first default location")
    info = json.loads((tmp_path / "preds" / "test_efficientnet_32_fold1.json").read_text())
    assert info["args"]["data_dir"] == str(tmp_path / "data")  # resolved: the JSON serves anywhere
    assert info["args"]["folds"] == str(tmp_path / "data" / "folds.csv")
    ensemble.main(sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "preds").glob("*.csv")) +
                  ["--bootstrap", "50"])
    report = json.loads((tmp_path / "submission.json").read_text())
    assert report["bootstrap_over"] == "patients" and "recorded by the runs" in capsys.readouterr().out
    csv_of(tmp_path / "t.csv", image_name=["NA", "nan"], target=["0", "1"], fold=["1", "-1"], w=["", "2.5"])
    df = melanoma.read_csv(tmp_path / "t.csv", ["image_name"], "train file",
                           {"target": "0 or 1", "fold": "a whole number", "w": "a finite number or empty"})
    assert df["image_name"].tolist() == ["NA", "nan"] and df["target"].tolist() == [0, 1]
    assert df["fold"].dtype == int and np.isnan(df["w"][0]) and df["w"][1] == 2.5
    with pytest.raises(ensemble.DataError, match=r"t.csv: row 3: fold must be a whole number, got '1.5'"):
        ensemble.check_numbers(pd.DataFrame(dict(fold=["1", "1.5"])), {"fold": "a whole number"}, "t.csv")
    smooth_image(1600, 1000).save(tmp_path / "a.jpg", quality=92)
    out = melanoma.load_image(str(tmp_path / "a.jpg"), 96)
    full = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB").resize((96, 96), Image.BILINEAR))
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8 and np.abs(out.astype(int) - full).mean() < 3
    with Image.open(tmp_path / "a.jpg") as im:  # the reduced-size decode is really taken
        assert im.draft("RGB", (96, 96))[1][2:] != (1600, 1000)
    smooth_image(200, 100).save(tmp_path / "a.png")
    png = np.asarray(Image.open(tmp_path / "a.png").convert("RGB").resize((50, 50), Image.BILINEAR))
    assert np.array_equal(melanoma.load_image(str(tmp_path / "a.png"), 50), png)
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    with pytest.raises(melanoma.DataError, match="c.jpg: cannot decode"):
        melanoma.load_image(str(tmp_path / "c.jpg"), 50)
    upright, exif = smooth_image(120, 80), Image.Exif()
    exif[0x0112] = 6  # a phone's sideways picture: rotate 90 degrees clockwise to view (ISIC's images have none)
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)
    a, b = (melanoma.load_image(str(tmp_path / f), 64).astype(int) for f in ("phone.jpg", "upright.jpg"))
    assert np.abs(a - b).mean() < 4 and np.abs(a - np.rot90(b)).mean() > 10
    # Names like numbers, a JPEG with trailing bytes, --resume with no checkpoint; no progress bars in a log.
    renames = {}
    for split, csv in (("train", "train.csv"), ("test", "test.csv")):
        df = pd.read_csv(data / csv)
        for i, name in enumerate(df["image_name"]):
            renames[name] = f"{i + (50000 if split == 'test' else 10000)}"
            (data / "jpeg" / split / f"{name}.jpg").rename(data / "jpeg" / split / f"{renames[name]}.jpg")
        df.assign(image_name=df["image_name"].map(renames)).to_csv(data / csv, index=False)
    break_csv(data, "folds.csv", lambda df: df.assign(image_name=df["image_name"].map(renames)))
    img = data / "jpeg" / "test" / "50000.jpg"
    img.write_bytes(img.read_bytes() + b"\x00" * 3000)
    out = tmp_path / "out"
    melanoma.main(argv(data, out, "--epochs", "1", "--resume"))
    said = capsys.readouterr()
    assert "--resume found no checkpoint" in said.out and "starting from scratch" in said.out
    assert "\r" not in said.err and "it/s" not in said.err
    json.loads((out / "test_efficientnet_32_fold0.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    test = pd.read_csv(out / "test_efficientnet_32_fold0_test.csv", dtype={"image_name": str})
    assert test["image_name"].iloc[0] == "50000" and len(test) == 30


def first(csv, **values):
    """A breakage of d/csv: each column's first values replaced by the given ones."""
    return lambda d: break_csv(d, csv, lambda df: df.assign(**{c: list(v) + list(df[c][len(v):])
                                                               for c, v in values.items()}))


DATA_REFUSALS = [  # (breakage, flags, words): bad tables, refused before training
    (lambda d: break_csv(d, "train.csv", lambda df: df.drop(columns="target")), [], ["missing column(s) target"]),
    (first("train.csv", target=["0", "1", "0", "yes"]), [], ["train.csv: row 5: target must be 0 or 1, got 'yes'"]),
    (lambda d: break_csv(d, "folds.csv", lambda df: df.iloc[5:]), [], ["5 image(s)", "missing"]),
    (first("folds.csv", fold=["0.5"] * 4), [], ["folds.csv", "row 2", "fold must be a whole number"]),
    (lambda d: shutil.rmtree(d / "jpeg"), [], ["no competition data found"]),
    (lambda d: break_csv(d, "test.csv", lambda df: pd.concat([df, df.iloc[:1]])), [],
     ["test.csv", "row 32", "duplicate image_name ISIC_9000000"]),
    (lambda d: break_csv(d, "test.csv", lambda df: df.iloc[:0]), [], ["test.csv", "no rows"]),
    (lambda d: break_csv(d, "train.csv", lambda df: df.iloc[:0]), [], ["train.csv", "no rows"]),
    (first("train.csv", image_name=[""]), [], ["train.csv", "row 2", "image_name is empty"]),
    (first("test.csv", image_name=[" ISIC_9000000"]), [], ["test.csv", "row 2", "surrounding spaces"]),
    (lambda d: break_csv(d, "folds.csv", lambda df: df.assign(fold=df["fold"].mask(df.eval("fold == '0' and target == '1'"),
     "1"))), ["--fold", "1", "0"], ["--fold 0", "validation images hold only one class"]),
    (lambda d: None, ["--fold", "7"], ["--fold 7", "not in"]),
    (lambda d: None, ["--folds", "{d}/jpeg"], ["folds file", "a folder, not a CSV file"]),
    (lambda d: ((d / "test.csv").unlink(), (d / "test.csv").mkdir()), [], ["test.csv", "a folder, not a CSV file"]),
    (lambda d: break_csv(d, "test.csv", lambda df: df.drop(columns=["sex", "age_approx"])), ["--meta"],
     ["test.csv", "--meta needs column(s) sex, age_approx"]),
    (first("train.csv", age_approx=["forty"]), ["--meta"],
     ["train.csv", "row 2", "age_approx must be a finite number or empty, got 'forty'"]),
    (first("train.csv", sex=["mole"]), ["--meta"], ["train.csv", "row 2", "sex 'mole' is none of male, female"]),
    (first("isic2019/train.csv", diagnosis=["XYZ"]), ["--external", "{d}/isic2019"],
     ["isic2019/train.csv", "row 2", "'XYZ'", "MEL"]),
    (lambda d: None, ["--external", "{d}/nowhere"], ["--external", "nowhere", "no train.csv"]),
    (first("train.csv", diagnosis=["nevus", "angioma"]), ["--target", "diagnosis"],
     ["train.csv", "row 3", "'angioma'", "MEL, NV", "lentigo NOS"]),
    (lambda d: break_csv(d, "train.csv", lambda df: df.drop(columns="diagnosis")), ["--target", "diagnosis"],
     ["train.csv", "--target diagnosis needs a diagnosis column"]),
    (first("train.csv", target=["0", "0", "1"], diagnosis=["nevus"] * 3), ["--target", "diagnosis"],
     ["row 4", "target 1, diagnosis 'nevus'", "disagree"]),
]


@pytest.mark.parametrize("breakage, flags, names", DATA_REFUSALS)
def test_bad_tables_are_one_line_before_training(data, tmp_path, capsys, breakage, flags, names):
    breakage(data)
    refused(argv(data, tmp_path / "out") + [f.format(d=data) for f in flags], capsys, *names)
    assert not (tmp_path / "out").exists()


# ---- The recipe: sampler --------------------------------------------------------------------------

def test_every_melanoma_every_epoch_each_benign_image_before_repeats_and_a_resume_draws_the_same():
    targets = np.array([1] * 7 + [0] * 50)
    per_epoch = melanoma.EpochSampler.per_pool(targets, epochs=4)
    assert per_epoch == 13  # the fewest whose 4 epochs cover all 50 benign images
    epochs = [melanoma.EpochSampler.indices(targets, per_epoch, seed=0, epoch=e) for e in range(12)]
    for e, idx in enumerate(epochs):
        assert len(idx) == len(set(idx)) == 7 + 13 and set(range(7)) <= set(idx)
        assert sorted(idx[idx >= 7] - 7) == sorted(melanoma.EpochSampler.negatives(50, 13, 0, e))
    stream = np.concatenate([melanoma.EpochSampler.negatives(50, 13, 0, e) for e in range(12)])
    for k in range(0, len(stream) - 50, 50):  # draws k..k+49 are all 50 negatives, once each
        assert sorted(stream[k:k + 50]) == list(range(50))
    assert set(epochs[0]) != set(epochs[1])
    assert melanoma.EpochSampler.per_pool(targets, 20, neg_ratio=3) == 21
    assert melanoma.EpochSampler.per_pool(targets, 20, neg_ratio=1e308) == 50  # a huge ratio: every one
    targets = np.array([1] * 5 + [0] * 40)
    a = melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=3)
    assert np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=3))
    assert not np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=2, epoch=3))
    assert not np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=4))
    running = melanoma.EpochSampler(targets, 8, 10, seed=1)
    for epoch in range(4):  # a run that went through epochs 0-3 ...
        running.set_epoch(epoch)
        batches = list(running)
    resumed = melanoma.EpochSampler(targets, 8, 10, seed=1)  # ... and one resumed at epoch 3
    resumed.set_epoch(3)
    assert list(resumed) == batches


@pytest.mark.parametrize("n_neg, batch, world", [(41, 4, 2), (40, 8, 2), (33, 5, 3), (30, 64, 1)])
def test_ranks_are_disjoint_take_the_same_steps_and_together_cover_the_sample(n_neg, batch, world):
    targets = np.array([1] * 6 + [0] * n_neg)
    single = melanoma.EpochSampler(targets, batch, 15, seed=0)
    ranks = [melanoma.EpochSampler(targets, batch, 15, seed=0, rank=r, world=world) for r in range(world)]
    for epoch in range(3):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0])  # same step count
        assert all(0 < len(b) <= batch for bs in batches for b in bs)
        flat = [i for bs in batches for b in bs for i in b]
        assert len(flat) == len(set(flat)) and sorted(flat) == sorted(i for b in single for i in b)
        assert sorted(flat) == sorted(melanoma.EpochSampler.indices(targets, 15, 0, epoch))


# ---- The recipe: model and training ---------------------------------------------------------------

def test_the_default_stack_is_the_recipes_its_views_the_same_for_a_seed_and_new_each_epoch():
    recipe = [K.RandomAffine(degrees=180, translate=(0.02, 0.02)), K.RandomHorizontalFlip(p=0.5),
              K.ColorJitter(brightness=0.1, contrast=(0.7, 1.3), saturation=(0.8, 1.2))]
    assert [repr(m) for m in melanoma.Augment(MEAN, STD).random] == [repr(m) for m in recipe]
    assert "degrees=180" in repr(recipe[0]) and "contrast=(0.7, 1.3)" in repr(recipe[2])
    assert textwrap.indent(melanoma.DEFAULT_AUGS, "   ") in (ROOT / "README.md").read_text()
    aug = melanoma.Augment(MEAN, STD, cutout=True)
    x = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    views = []
    for epoch in (0, 0, 1):  # as train_fold seeds each epoch's augmentation
        melanoma.seed_all(0, melanoma.AUGMENT, epoch, 0)
        views.append(aug(x))
    a = views[0]
    lo, hi = ((v - torch.tensor(MEAN)) / torch.tensor(STD) for v in (0, 1))
    assert a.shape == (8, 3, 40, 40) and a.dtype == torch.float32 and a.is_contiguous(memory_format=torch.channels_last)
    assert (a.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (a.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    assert torch.equal(views[0], views[1]) and not torch.allclose(views[0], views[2])
    expected = (x.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(aug(x, random=False), expected, atol=1e-6)
    torch.manual_seed(5)
    after = torch.rand(3)
    torch.manual_seed(5)
    with melanoma.seeded(9):  # seeded draws leave the global generator alone
        torch.rand(10)
    assert torch.equal(torch.rand(3), after)


def test_net_onecycle_and_adamw_follow_the_recipe_and_the_loss_falls(monkeypatch, accelerator):
    torch.manual_seed(0)
    plain = melanoma.Net(melanoma.Net.timm_backbone("test_efficientnet", False))
    assert isinstance(plain.head, torch.nn.Linear) and plain.head.out_features == 1
    torch.manual_seed(0)
    extras = net()
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == [(k, v.shape) for k, v in extras.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), extras.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(plain.eval()(x), extras.eval()(x), atol=1e-6)
    monkeypatch.setattr(timm, "create_model", mock.Mock(side_effect=OSError("no network")))
    with pytest.raises(melanoma.DataError, match="could not get pretrained weights.*--weights.*--no-pretrained"):
        melanoma.Net.timm_backbone("test_efficientnet", pretrained=True)
    monkeypatch.setattr(timm, "create_model", mock.Mock(side_effect=RuntimeError("a bug in a model")))
    with pytest.raises(RuntimeError, match="a bug in a model"):  # nothing was downloaded: not that
        melanoma.Net.timm_backbone("test_efficientnet", pretrained=True)
    with pytest.raises(melanoma.DataError, match="not a timm model.*did you mean"):
        melanoma.Net.timm_backbone("resnet", pretrained=False)
    monkeypatch.undo()
    # The recipe's AdamW(model.parameters(), weight_decay=0.1): biases and norms decay too.
    args = melanoma.get_args([*TINY, "--lr-min", "1e-4", "--lr-max", "2e-3", "--wd", "0.05", "--epochs", "4"])
    raw_model, _, _, optimizer, scheduler = melanoma.build_training(args, accelerator, net(), None, 10)
    lrs = [(scheduler.get_last_lr()[0], optimizer.step(), scheduler.step())[0] for _ in range(40)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(2e-3, rel=1e-3)
    assert int(np.argmax(lrs)) in (11, 12) and lrs[-1] < 1e-4 / 1000  # the peak at 30 %, the end near 0
    group, = optimizer.param_groups
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(list(raw_model.parameters()))
    # Dark images are melanomas, light ones not: a few epochs of the recipe's loop learn it.
    torch.manual_seed(0)
    args = melanoma.get_args([*TINY, "--lr-max", "1e-2", "--epochs", "6"])
    _, model, augment, optimizer, scheduler = melanoma.build_training(args, accelerator, net(), [], 4)
    y = torch.tensor([1.0, 0] * 16)
    x = torch.where(y[:, None, None, None] == 1, 40, 215).expand(32, 3, 32, 32).to(torch.uint8)
    batches = [(x[i:i + 8], torch.arange(i, i + 8)) for i in range(0, 32, 8)]  # both classes in each
    losses = [melanoma.train_one_epoch(model, augment, batches, optimizer, scheduler, accelerator, y, e, 6)[0]
              for e in range(6)]
    assert losses[-1] < 0.5 * losses[0]


# ---- The recipe: prediction with TTA, and the outputs ---------------------------------------------

def test_tta_is_the_mean_of_seeded_views_of_one_decode_and_writes_replace_whole_files(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, aug = net().eval(), melanoma.Augment(MEAN, STD)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = melanoma.predict_batch(model, aug, x, 0, (7,))
        assert torch.allclose(plain, torch.sigmoid(model(aug(x, random=False))).squeeze(1))
        views = [seeded((7, v), lambda: torch.sigmoid(model(aug(x))).squeeze(1)) for v in range(3)]
        tta = melanoma.predict_batch(model, aug, x, 3, (7,))
    assert torch.allclose(tta, torch.stack(views).mean(0), atol=1e-6) and not torch.allclose(tta, plain)
    files = sorted((tiny_data / "jpeg" / "test").iterdir())[:5]
    load = lambda: torch.stack([torch.from_numpy(melanoma.load_image(str(f), 32)).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        once = melanoma.predict_batch(model, aug, load(), 4, (1, 2))
        again = [seeded((1, 2, view), lambda: torch.sigmoid(model(aug(load()))[:, 0])) for view in range(4)]
    assert torch.equal(once, torch.stack(again).sum(0) / 4)
    path, other = tmp_path / "p.csv", tmp_path / "q.csv"
    path.write_text("old")
    for error, caught in ((KeyboardInterrupt(), KeyboardInterrupt), (ValueError("a bug in savefig"), ValueError),
                          (OSError(28, "No space left on device"), melanoma.DataError)):
        with pytest.raises(caught) as e:  # q.csv's writer works, p.csv's fails: both new or both old
            melanoma.atomic_write_all({other: lambda tmp: Path(tmp).write_text("new"), path: mock.Mock(side_effect=error)})
        assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.csv"]
    assert str(e.value) == f"{path}: cannot write it (No space left on device); nothing was replaced"
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replace(src, dst) if dst != path else os.rmdir(path))
    with pytest.raises(melanoma.DataError) as e:  # p.csv cannot be replaced (rmdir of a file fails): q.csv was
        melanoma.atomic_write_all({other: lambda tmp: Path(tmp).write_text("new"), path: lambda tmp: None})
    assert str(e.value) == f"{path}: cannot write it (Not a directory); {other} replaced already"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "q.csv"] and path.read_text() == "old"


@pytest.mark.parametrize("file", [".safetensors", "_last.pt"])
def test_a_full_disk_is_one_line_and_leaves_the_fold_unfinished(tiny_data, tmp_path, capsys, monkeypatch, file):
    out = tmp_path / "out"
    melanoma.main(argv(tiny_data, out, "--epochs", "1", "--tta", "0"))
    write_bytes = Path.write_bytes

    def full(path, content):
        if file in path.name:
            raise OSError(28, "No space left on device")
        return write_bytes(path, content)

    monkeypatch.setattr(Path, "write_bytes", full)
    refused(argv(tiny_data, out, "--epochs", "1", "--tta", "1", "--overwrite"), capsys,
            f"{file}: cannot write it (No space left on device)", "not finished")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    if file == ".safetensors":  # the old JSON went first: the fold, half replaced, is not taken for finished
        assert not list(out.glob("*.json"))
    else:  # an epoch's checkpoint: nothing of the old fold was replaced yet
        assert json.loads((out / "test_efficientnet_32_fold0.json").read_text())["args"]["tta"] == 0


# ---- Flags of the extras, and the run's checks ----------------------------------------------------

FLAG_REFUSALS = [  # (flags, words): refused when parsed, in one line
    (["--size", "0"], "--size: must be positive"), (["--size", "100000"], "--size: must be at most 4096"),
    (["--size", "x"], "--size: invalid int value"), (["--frac", "0"], "--frac"), (["--frac", "nan"], "--frac"),
    (["--neg-ratio", "nan"], "--neg-ratio: must be a finite number"), (["--neg-ratio", "-1"], "must be positive"),
    (["--lr-min", "0"], "--lr-min: must be at least 1e-12"), (["--lr-max", "-1"], "--lr-max: must be at least 1e-12"),
    (["--lr-max", "inf"], "--lr-max: must be a finite number"), (["--wd", "nan"], "--wd: must be a finite number"),
    (["--wd", "-0.1"], "--wd: must be 0 or more"), (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--tta", "-2"], "--tta: must be 0 or more"), (["--num-workers", "1000"], "--num-workers: must be at most 64"),
    (["--fold", "1", "1"], "--fold lists a fold twice"), (["--batch-size", "99999999999"], "at most 65536"),
    (["--lr-min", "1e-320", "--lr-max", "1e308"], "--lr-min: must be at least 1e-12"),
    (["--name", "a/b"], "--name: must be a plain file-name part"), (["--name", "a\nb"], "on one line"),
    (["--name", "a\rb"], "on one line"), (["--name", "n" * 240], "of at most 150 characters"),
    (["--name=-x"], "not starting with '.' or '-'"), (["--name", " x"], "got ' x'"),  # --runs prints them
    (["--name", " "], "--name: empty"), (["--out", "\t"], "--out: empty"),
    (["--lr-min", "1e-2", "--lr-max", "1e-3"], "need --lr-min <= --lr-max"), (["--weights", "w", "--init-from", "r"], "pass one"),
    (["--name", "caf\udce9"], "--name: not valid UTF-8 text"), (["--out", "o\udce9"], "--out: not valid UTF-8"),
    (["--resume", "--overwrite"], "pass one"), (["--skip-bad"], "--skip-bad goes with --predict"),
    (["--explain", "100000"], "--explain: must be at most 32"), (["--explain", "0"], "--explain: must be at least 1"),
    (["--explain", "2", "--lr-find"], "are two tools: pass one"), (["--explain", "2", "--runs", "o"], "two tools"),
    (["--explain", "2", "--benchmark"], "two tools"), (["--explain", "2", "--make-folds", "t.csv"], "two tools"),
    (["--lr-find", "--runs"], "are two tools: pass one"), (["--hair", "1.5"], "--hair: must be at most 1"),
    (["--lr-find", "--lr-find-start", "1", "--lr-find-end", "1e-3"], "need --lr-find-start < --lr-find-end"),
    (["--lr-find", "--lr-find-steps", "3"], "--lr-find-steps: must be at least 10"),
    (["--lr-find", "--lr-find-batches", "0"], "--lr-find-batches: must be at least 1"),
    (["--lr-find", "--lr-find-batches", "65"], "--lr-find-batches: must be at most 64"),
    (["--lr-find", "--lr-find-start", "1e-300"], "--lr-find-start: must be at least 1e-12"),
    (["--msd", "4"], "--msd averages over dropout masks"), (["--dropout", "1"], "--dropout: must be below 1"),
    (["--external-neg-ratio", "2"], "--external-neg-ratio needs --external"), (["--head", "big"], "invalid choice"),
    (["--log-with", "tensorbored"], "invalid choice: 'tensorbored'"), (["--dem"], "unrecognized arguments: --dem"),
] + [([flag, ""], f"{flag}: empty") for flag in ("--predict", "--runs", "--augs", "--init-from", "--weights", "--out",
                                                  "--folds", "--data-dir", "--cache", "--model", "--external")]


@pytest.mark.parametrize("flags, message", FLAG_REFUSALS)
def test_bad_flags_are_one_line_before_anything_is_read_or_written(tiny_data, tmp_path, capsys, flags, message):
    refused(argv(tiny_data, tmp_path / "out") + flags, capsys, message)
    assert not (tmp_path / "out").exists()


OUTPUT_REFUSALS = [  # (setup, flags, words): output locations that would be lost or misread
    (lambda d, o: made(d / "outfile", "x"), ["--out", "{d}/outfile"], ["--out", "outfile", "a file, not a folder"]),
    (lambda d, o: made(d / "outfile", "x"), ["--out", "{d}/outfile/sub"], ["--out", "is a file, not a folder"]),
    (lambda d, o: made(d / "cachefile", "x"), ["--cache", "{d}/cachefile"], ["--cache", "a file, not a folder"]),
    (lambda d, o: (o / "test_efficientnet_32_fold0_oof.csv").mkdir(parents=True), [],
     ["fold0_oof.csv", "a folder where an output file goes"]),
    (lambda d, o: (o / "runs.csv").mkdir(parents=True), [], ["runs.csv", "a folder where an output file goes"]),
    (lambda d, o: (o.mkdir(), (o / "runs.csv").symlink_to(o / "runs.csv")), [], ["runs.csv", "a link to nowhere"]),
    (lambda d, o: (o.mkdir(), (o / "runs.csv").symlink_to(o / "gone" / "runs.csv")), [], ["a link to nowhere"]),
    (lambda d, o: (o.mkdir(), (o / "runs.csv").write_text(LEDGER_ROW + '0.5,0.5,1,"--s,o\n')),
     [], ["runs.csv", "cannot read it as CSV"]),
    (lambda d, o: (o / "logs" / "x_fold1").parent.mkdir(parents=True) or (o / "logs" / "x_fold1").write_text(""),
     ["--name", "x", "--fold", "0", "1", "--log-with", "tensorboard"], ["x_fold1", "a file, not a folder"]),
    (lambda d, o: (o / "x_lr_find.png").mkdir(parents=True), ["--name", "x", "--lr-find"],
     ["x_lr_find.png", "a folder where an output file goes"]),
    (lambda d, o: (o / "x_lr_find.csv").mkdir(parents=True), ["--name", "x", "--lr-find"], ["x_lr_find.csv"]),
    (lambda d, o: (o.mkdir(), os.mkfifo(o / "runs.csv")), [], ["runs.csv", "a pipe or device"]),  # would hang
    (lambda d, o: made(made(o) / "logs") and (o / "logs" / "x_fold0").symlink_to(o / "gone"), ["--name", "x",
     "--log-with", "tensorboard"], ["x_fold0", "a link to nowhere"]),
    (lambda d, o: made(d / "mine") and made(d / "mine" / "notes.csv", "mine"), ["--demo", "--data-dir", "{d}/mine"],
     ["not an empty folder"]),
    (lambda d, o: made(d / "f", "x"), ["--demo", "--data-dir", "{d}/f/d"], ["--demo --data-dir", "is a file"]),
]


@pytest.mark.parametrize("setup, flags, names", OUTPUT_REFUSALS)
def test_outputs_that_would_be_lost_or_misread_are_refused_up_front(data, tmp_path, capsys, setup, flags, names):
    out = tmp_path / "out"
    setup(data, out)
    before = sorted(tmp_path.rglob("*"))
    refused(argv(data, out) + [f.format(d=data) for f in flags], capsys, *names)
    assert sorted(tmp_path.rglob("*")) == before  # nothing trained, nothing written


def test_an_unwritable_output_or_log_folder_and_fp16_on_the_cpu_are_refused(tiny_data, tmp_path, capsys, monkeypatch):
    done = run_cli("melanoma.py", *argv(tiny_data, tmp_path / "out", "--mixed-precision", "fp16", "--cpu"))
    assert done.returncode == 2 and done.stderr == "error: --mixed-precision fp16 needs a GPU; on the CPU use bf16 or no\n"
    temporary = melanoma.tempfile.TemporaryFile
    locked = [str(tmp_path)]  # out is not there: its nearest folder is checked

    def read_only(*a, dir=None, **k):
        if any(str(dir).startswith(p) for p in locked):
            raise PermissionError(13, "Permission denied")
        return temporary(*a, dir=dir, **k)

    monkeypatch.setattr(melanoma.tempfile, "TemporaryFile", read_only)
    refused(argv(tiny_data, tmp_path / "out"), capsys, "--out", "cannot write in", "Permission denied")
    (tmp_path / "logged" / "logs" / "t_fold0").mkdir(parents=True)
    locked[0] = str(tmp_path / "logged" / "logs" / "t_fold0")  # the tracker would end the run when it opens
    refused(argv(tiny_data, tmp_path / "logged", "--name", "t", "--log-with", "tensorboard"), capsys,
            "t_fold0", "cannot write in")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "logged").glob("*.json"))


# ---- Resume and finished folds: a run records what it used, when it read it ---------------------

def test_inputs_edited_while_a_fold_trains_are_recorded_as_they_were_read(data, run, tmp_path, capsys, monkeypatch):
    """train.csv, --augs and --init-from edited mid-fold: the JSON records what trained, --predict rebuilds it."""
    (tmp_path / "augs.yaml").write_text(melanoma.DEFAULT_AUGS)
    out, weights = run, run / "tiny_fold0.safetensors"
    before = {f: melanoma.content_key(f) for f in (data / "train.csv", tmp_path / "augs.yaml", weights)}

    def edit(epoch):
        if epoch == 0:
            break_csv(data, "train.csv", lambda df: df.assign(target=df["target"].where(df.index != 1, "1")))
            (tmp_path / "augs.yaml").write_text(melanoma.DEFAULT_AUGS.replace("degrees: 180", "degrees: 5"))
            save_file({k: v + 1 for k, v in load_file(weights).items()}, weights)

    on_every_epoch(monkeypatch, edit)
    flags = argv(data, out, "--tta", "2", "--name", "big", "--augs", tmp_path / "augs.yaml", "--init-from", "tiny")
    melanoma.main(flags)
    info = json.loads((out / "big_fold0.json").read_text())
    assert info["augs"] == yaml.safe_load(melanoma.DEFAULT_AUGS)  # as read, degrees 180
    assert info["run"]["data_dir"][0] == before[data / "train.csv"]
    assert info["run"]["augs"] == before[tmp_path / "augs.yaml"] and info["init"] == before[weights]
    monkeypatch.undo()
    refused(flags, capsys, "big_fold0.json", "saved with other settings", "--data-dir", "--augs")
    ours = predict(out, data / "test.csv", "--tta", "2", name="big")["fold0"].to_numpy()
    assert np.array_equal(ours, pd.read_csv(out / "big_fold0_test.csv")["target"].to_numpy())  # the trained stack


def test_resume_after_a_kill_is_the_same_run_and_finished_folds_kept_whole(tiny_data, tmp_path, capsys, data, run):
    args = argv(tiny_data, tmp_path / "a", "--epochs", "3")
    melanoma.main(args)
    args[args.index("--out") + 1] = str(tmp_path / "b")
    ckpt = tmp_path / "b" / "test_efficientnet_32_fold0_last.pt"
    proc = subprocess.Popen([sys.executable, "melanoma.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 1  # killed during epoch 2
    assert not list((tmp_path / "b").glob("*.csv"))
    refused(args, capsys, "an unfinished run is there", "--resume")
    melanoma.main(args + ["--resume"])
    assert "resuming after epoch 1" in capsys.readouterr().out
    for kind in ("oof", "test"):
        a, b = (pd.read_csv(tmp_path / d / f"test_efficientnet_32_fold0_{kind}.csv") for d in "ab")
        assert a["image_name"].equals(b["image_name"])
        assert np.allclose(a.iloc[:, 1:].to_numpy(float), b.iloc[:, 1:].to_numpy(float), atol=1e-6)
    ja, jb = (json.loads((tmp_path / d / "test_efficientnet_32_fold0.json").read_text()) for d in "ab")
    assert [e["loss"] for e in ja["epochs"]] == pytest.approx([e["loss"] for e in jb["epochs"]], abs=1e-6)
    acc = SimpleNamespace(mixed_precision="no", num_processes=1)
    a = melanoma.get_args(["--data-dir", f"{tiny_data}/", "--folds", f"{tiny_data}/./folds.csv"])
    b = melanoma.get_args(["--data-dir", str(tiny_data), "--folds", str(tiny_data / "folds.csv")])
    assert melanoma.run_key(a, acc) == melanoma.run_key(b, acc)
    assert melanoma.run_key(a, acc) != melanoma.run_key(b, SimpleNamespace(mixed_precision="bf16", num_processes=1))
    ckpt = fake_checkpoint(tiny_data, ckpts := tmp_path / "ckpts", [], fold=1)
    refused(argv(tiny_data, ckpts, "--fold", "0", "1"), capsys, ckpt.name, "--resume", "--overwrite")
    assert [p.name for p in ckpts.iterdir()] == [ckpt.name]
    image = first_image(data)
    image.rename(tmp_path / "aside.jpg")  # a finished fold decodes nothing: its images are not checked again
    args = argv(data, run, "--epochs", "1", "--tta", "0", "--name", "tiny")  # data, a copy, counts by its tables
    melanoma.main(args)
    assert "fold 0: finished already with these settings" in capsys.readouterr().out
    for flags, names in ((["--size", "48"], ["--size 32 (saved) vs 48 (now)"]), (["--tta", "3"], ["--tta 0 (saved)"])):
        refused(args + flags, capsys, "tiny_fold0.json", "saved with other settings", "--overwrite", *names)
    refused(args + ["--fold", "1", "--size", "48"], capsys, "--name tiny", "fold 0 (tiny_fold0.json)",
            "--size 32 (saved) vs 48 (now)", "its own --name")
    assert not list(run.glob("tiny_fold1*"))  # one name holding two recipes: refused before the second fold starts
    (tmp_path / "aside.jpg").rename(image)
    b = argv(data, run, "--epochs", "1", "--tta", "0", "--name", "b", "--init-from", "tiny")
    melanoma.main(b)
    weights = load_file(run / "tiny_fold0.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, run / "tiny_fold0.safetensors")
    refused(b, capsys, "b_fold0.json", "other --init-from weights")
    save_file(weights, run / "tiny_fold0.safetensors")
    melanoma.main(b)
    assert "finished already" in capsys.readouterr().out
    (run / "b_fold0_oof.csv").unlink()
    refused(b, capsys, "b_fold0_oof.csv", "missing from a finished fold")
    (run / "b_fold0.safetensors").unlink()
    refused(["--predict", data / "test.csv", "--name", "b", "--out", run], capsys, "b_fold0.json", "without its weights")
    (run / "tiny_fold0.json").write_text("{trunc")
    refused(args, capsys, "tiny_fold0.json", "cannot be read", "--overwrite")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def fake_checkpoint(data, out, saved, fold=0):
    """A checkpoint as melanoma.py writes it, with the run key of the settings `saved`."""
    args = melanoma.get_args(argv(data, out, "--fold", fold) + saved)
    key = melanoma.run_key(args, SimpleNamespace(mixed_precision=args.mixed_precision or "no", num_processes=1))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model={}, optimizer={}, scheduler={}, history=[], run=key), out / f"test_efficientnet_32_fold{fold}_last.pt")
    return out / f"test_efficientnet_32_fold{fold}_last.pt"


CHECKPOINT_REFUSALS = [  # (how fold 0's checkpoint was made, words): --resume names what is wrong with it
    (["--mixed-precision", "bf16"], ["saved with other settings", "--mixed-precision 'bf16' (saved) vs 'no' (now)"]),
    (["--lr-max", "1e-3"], ["saved with other settings", "--lr-max 0.001 (saved) vs 0.003 (now)"]),
    (["--size", "48", "--cutout"], ["--size 48 (saved) vs 32 (now)", "--cutout True (saved) vs False (now)"]),
    (["--target", "diagnosis"], ["--target 'diagnosis' (saved) vs 'melanoma' (now)"]),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), ["a checkpoint that cannot be read"]),
    (lambda p: torch.save({"model": Evil()}, p), ["a checkpoint that cannot be read"]),  # a pickle that runs code
    (lambda p: torch.save({"model": {}}, p), ["not melanoma.py's"]),
]


@pytest.mark.parametrize("made_by, names", CHECKPOINT_REFUSALS)
def test_resume_refuses_checkpoints_of_other_settings_damaged_or_hostile(tiny_data, tmp_path, capsys, made_by, names):
    ckpt = tmp_path / "test_efficientnet_32_fold0_last.pt"
    fake_checkpoint(tiny_data, tmp_path, made_by) if isinstance(made_by, list) else made_by(ckpt)
    err = refused(argv(tiny_data, tmp_path, "--resume"), capsys, ckpt.name, *names)
    assert "--seed" not in err and [p.name for p in tmp_path.iterdir()] == [ckpt.name]


# ---- Image checks ---------------------------------------------------------------------------------

def with_sof_size(jpeg, width, height):
    """JPEG bytes whose frame header claims width x height (the pixel data stays as it was)."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9:]


IMAGE_REFUSALS = [  # (breakage, words): every image is checked before the first epoch, all named at once
    (lambda d: first_image(d).unlink(), "No such file"),
    (lambda d: first_image(d).write_bytes(first_image(d).read_bytes()[:300]), "truncated"),
    (lambda d: smooth_image(64, 48).save(first_image(d), "PNG"), "no JPEG header"),
    (lambda d: first_image(d).write_bytes(b""), "empty file"),
    (lambda d: first_image(d, "test").unlink(), "jpeg/test/"),
    (lambda d: first_image(d, "test").write_bytes(with_sof_size(first_image(d, "test").read_bytes(), 60000, 60000)),
     "decompression bomb"),
    (lambda d: first_image(d, "test").write_bytes(first_image(d, "test").read_bytes()[:-200]), "truncated"),
    (lambda d: (lambda p: (p.unlink(), p.mkdir()))(first_image(d)), "a folder, not an image"),
    (lambda d: (d / "isic2019" / "train" / "ISIC_1000010.jpg").unlink(), "ISIC_1000010.jpg"),
]


@pytest.mark.parametrize("breakage, message", IMAGE_REFUSALS)
def test_bad_images_are_one_line_before_training(data, tmp_path, capsys, breakage, message):
    breakage(data)
    refused(argv(data, tmp_path / "out", "--external", data / "isic2019"), capsys, "cannot be used", message)
    assert not (tmp_path / "out").exists()


def test_image_checks_read_whole_images_share_the_work_and_a_late_fault_is_one_line(data, tmp_path, capsys, monkeypatch):
    img = first_image(data)  # passes the cheap check (an end marker after the scan's start), then fails
    img.write_bytes(img.read_bytes()[:200] + b"\x00" * 50 + b"\xff\xd9")
    refused(argv(data, tmp_path / "out", "--num-workers", "1"), capsys, img.name)
    smooth_image(300, 200).save(tmp_path / "a.jpg", quality=90)
    smooth_image(300, 200).save(tmp_path / "p.jpg", quality=90, progressive=True)
    for name in ("a.jpg", "p.jpg"):
        data = (tmp_path / name).read_bytes()
        for ok, cut in ((True, data), (True, data + bytes(5000)),  # trailing bytes after the end marker
                        (False, data[:len(data) // 2]), (False, data[:-2] + bytes(5000)), (False, data[:-2])):
            (tmp_path / "t.jpg").write_bytes(cut)
            assert (melanoma.image_fault(str(tmp_path / "t.jpg")) is None) == ok
    # a camera's multi-picture JPEG (MPO) is a JPEG
    smooth_image(300, 200).save(tmp_path / "m.jpg", "MPO", save_all=True, append_images=[smooth_image(300, 200)])
    assert melanoma.image_fault(str(tmp_path / "m.jpg")) is None
    assert melanoma.image_fault(jpeg_with_thumbnail_before_its_scan(tmp_path / "whole.jpg", 10**6)) is None
    cut = jpeg_with_thumbnail_before_its_scan(tmp_path / "cut.jpg", 200)
    assert b"\xff\xd9" in Path(cut).read_bytes()[-1024:] and Image.open(cut).size  # its header reads
    assert "truncated" in melanoma.image_fault(cut)
    smooth_image(64, 48).save(tmp_path / "d.png")  # damaged data, its end chunk intact
    png = bytearray((tmp_path / "d.png").read_bytes())
    start = png.index(b"IDAT") + 8
    png[start:start + 20] = bytes(20)
    (tmp_path / "d.png").write_bytes(png)
    assert "not a complete PNG" in melanoma.image_fault(str(tmp_path / "d.png"))
    with pytest.raises(melanoma.DataError, match=r"2 image\(s\) cannot be used \(of 2\)"):
        melanoma.check_images([str(tmp_path / "d.png"), cut])
    seen = []  # each process checks its share of the images, and all learn of every bad one
    monkeypatch.setattr(melanoma, "image_fault", lambda path: seen.append(path) or ("bad" if path == "c" else None))
    monkeypatch.setattr(melanoma, "gather_object", lambda shares: shares + [{"b": "image b: bad"}])  # the other rank
    with pytest.raises(melanoma.DataError, match="2 image.*of 4.*image b: bad; image c: bad"):
        melanoma.check_images(list("abcd"), SimpleNamespace(process_index=0, num_processes=2))
    assert seen == ["a", "c"]


def jpeg_with_thumbnail_before_its_scan(path, cut):
    """A JPEG with a whole thumbnail JPEG (and its end marker) just before its first scan, cut `cut` bytes after."""
    main, thumb = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)).save(main, "JPEG")
    smooth_image(8, 8, 1).save(thumb, "JPEG", quality=50)
    main, thumb = main.getvalue(), thumb.getvalue()
    sos = main.index(b"\xff\xda")
    app1 = b"\xff\xe1" + (2 + 6 + len(thumb)).to_bytes(2, "big") + b"Exif\0\0" + thumb
    path.write_bytes((main[:sos] + app1 + main[sos:])[:sos + len(app1) + cut])
    return str(path)


# ---- Metadata and heads ---------------------------------------------------------------------------

def meta_table(**cols):
    df = pd.DataFrame(cols).assign(path="")
    df["patient_images"] = df.groupby("patient_id")["image_name"].transform("size")
    return df


def test_meta_features_scale_mark_missing_share_categories_and_heads_average_masks():
    train = meta_table(image_name=["a", "b", "c", "d"], patient_id=["p", "p", "p", "q"],
                       sex=["male", "female", None, "male"], age_approx=[30, 50, np.nan, 70],
                       anatom_site_general_challenge=["torso", None, "torso", "head/neck"], width=[600, 600, 6000, 6000],
                       height=[400, 400, 4000, 4000])
    test = meta_table(image_name=["t"], patient_id=["r"], sex=["female"], age_approx=[50],
                      anatom_site_general_challenge=["palms/soles"], width=[600], height=[400])
    spec = melanoma.fit_meta(train, test)
    assert spec["sites"] == ["head/neck", "palms/soles", "torso"] and spec["size"] == "pixels"  # test-only site kept
    assert spec["age"] == pytest.approx([50, 20])
    a, b = melanoma.meta_features(train, spec), melanoma.meta_features(test, spec)
    width = melanoma.ExtrasNet.shape(melanoma.get_args([]), spec, None)["n_meta"]
    assert a.shape == (4, width) == (4, 12) and b.shape == (1, 12) and a.dtype == np.float32
    # columns: female, male, sex missing, head/neck, palms/soles, torso, site missing, age, age missing,
    # patient images, size, size missing
    assert a[:, :3].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert a[:, 3:7].tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]] and b[0, 3:7].tolist() == [0, 1, 0, 0]
    assert a[:, 7].tolist() == pytest.approx([-1, 0, 0, 1]) and a[:, 8].tolist() == [0, 0, 1, 0]
    assert a[0, 9] > a[3, 9] and a[0, 10] < a[2, 10]  # 3 images vs 1; 600x400 vs 6000x4000
    assert melanoma.meta_features(train.assign(width=[600, np.nan, 6000, 6000]), spec)[1, 10:].tolist() == [0, 1]
    assert melanoma.with_meta(train.iloc[:0], spec).shape == (0, train.shape[1] + 12)
    no_age = melanoma.fit_meta(train.assign(age_approx=np.nan), test.iloc[:0])
    assert no_age["age"] == [0.0, 1.0]  # no age known: the missing indicator carries it
    df = pd.DataFrame(dict(image_name=list("abcdef"), patient_id=list("pqrstu"), age_approx=[""] * 6,
                           sex=["MALE", "male", "m", " Female", "unknown", ""], anatom_site_general_challenge=[""] * 6))
    assert melanoma.meta_columns(df, "t.csv")["sex"].tolist() == ["male", "male", "male", "female", "", ""]
    torch.manual_seed(0)
    x, meta = torch.randn(6, 3, 32, 32), torch.randn(6, 5)
    for head in ("linear", "mlp"):
        model = net(n_meta=5, head=head, dropout=0.5, msd=4).eval()
        out = model(x, meta)
        assert out.shape == (6, 1) and torch.equal(out, model(x, meta))  # eval: deterministic
        model.msd = 1
        assert torch.allclose(out, model(x, meta))  # in eval, msd changes nothing
        model.train()
        model.msd = 4
        many = seeded((1,), lambda: model(x, meta))
        masks = seeded((1,), lambda: [model.head(model.dropout(f)) for f in [torch.cat([model.backbone(x), model.meta(
            meta)], 1)] for _ in range(4)])  # by hand: one pass through the body, 4 masks over its features
        assert torch.allclose(many, torch.stack(masks).mean(0), atol=1e-6)  # the mean over 4 masks


# ---- External data and the diagnosis target -------------------------------------------------------

def test_external_data_and_the_diagnosis_target_train_and_predict(data, tmp_path, capsys, tiny_data, run):
    args = melanoma.get_args(argv(data, tmp_path, "--external", data / "isic2019", "--external-neg-ratio", "2",
                                  "--epochs", "4"))
    acc = SimpleNamespace(process_index=0, num_processes=1, print=lambda *a: None, mixed_precision="no")
    hooks = melanoma.Extras(args, acc)
    train, _ = hooks.rows(*melanoma.read_data(args, hooks, acc.print))
    assert (train.loc[train["external"], "fold"] == -1).all() and train["image_name"].is_unique
    for fold in range(5):
        trn, val = melanoma.split_fold(train, fold, 1.0, 0)
        assert not val["external"].any() and trn["external"].sum() == 147
    trn, _ = melanoma.split_fold(train, 0, 1.0, 0)
    chosen = trn.iloc[[i for b in hooks.sampler(trn) for i in b]]
    ext_pos = int((trn["external"] & (trn["target"] == 1)).sum())
    assert (chosen["target"] == 1).sum() == trn["target"].sum()  # every melanoma
    assert ((chosen["target"] == 0) & chosen["external"]).sum() == 2 * ext_pos
    comp_neg = int(((trn["target"] == 0) & ~trn["external"]).sum())
    assert ((chosen["target"] == 0) & ~chosen["external"]).sum() == -(-comp_neg // 4)
    flags = argv(data, tmp_path / "out", "--epochs", "1", "--tta", "0", "--external")
    melanoma.main(flags + [str(data / "isic2019")])
    shutil.copytree(data / "isic2019", tmp_path / "elsewhere")  # no test.csv: counted as missing, not by path
    melanoma.main(flags + [str(tmp_path / "elsewhere")])
    assert "finished already" in capsys.readouterr().out
    out = tmp_path / "dx"
    melanoma.main(argv(tiny_data, out, "--target", "diagnosis", "--external", tiny_data / "isic2019", "--meta",
                       "--head", "mlp", "--dropout", "0.2", "--msd", "2", "--epochs", "1", "--name", "dx"))
    log = capsys.readouterr().out
    assert "147 images" in log and "3 dropped, already among the training images" in log
    info = json.loads((out / "dx_fold0.json").read_text())
    assert info["classes"] == ["MEL", "NV", "BCC", "BKL", "AK", "SCC", "VASC", "DF", "UNK"] and "classes MEL " in log
    assert info["run"]["target"] == "diagnosis" and load_file(out / "dx_fold0.safetensors")["head.3.weight"].shape == (9, 256)
    folds = pd.read_csv(tiny_data / "folds.csv")
    assert info["n_external"] == 147 and info["n_train"] == (folds["fold"] != 0).sum() + 147
    assert info["meta"]["size"] == "bytes" and "--target diagnosis" in pd.read_csv(out / "runs.csv")["settings"].iloc[-1]
    fold_outputs(tiny_data, out, "dx", 0)  # every validation image once, none external
    ours = predict(out, tiny_data / "test.csv", "--tta", "2", "--explain", "1", name="dx")["fold0"].to_numpy()
    assert np.array_equal(ours, pd.read_csv(out / "dx_fold0_test.csv")["target"].to_numpy())  # P(melanoma), exactly
    assert is_png(out / "dx_fold0_explain.png", 100)
    melanoma.main(argv(tiny_data, out, "--meta", "--epochs", "1", "--tta", "0", "--name", "mm", "--init-from", "dx"))
    assert (out / "mm_fold0.json").is_file() and "another --head" in capsys.readouterr().out
    info["classes"] = ["NV", "BKL"]
    (out / "dx_fold0.json").write_text(json.dumps(info))
    refused(["--predict", tiny_data / "test.csv", "--name", "dx", "--out", out], capsys, "dx_fold0.json",
            "no melanoma (MEL)")
    common = argv(tiny_data, run, "--epochs", "1", "--tta", "0", "--target", "diagnosis")
    melanoma.main(common + ["--init-from", "tiny", "--name", "dx"])
    log = capsys.readouterr().out
    assert "tiny_fold0.safetensors: the body loads; head.bias [1] there, [4] here" in log and "start afresh" in log
    assert json.loads((run / "dx_fold0.json").read_text())["classes"] == ["MEL", "NV", "BKL", "UNK"]
    refused(common + ["--name", "tiny"], capsys, "tiny_fold0.json", "saved with other settings",
            "--target 'melanoma' (saved) vs 'diagnosis' (now)")
    table = (data / "train.csv").read_bytes()
    break_csv(data, "train.csv", lambda df: df.assign(diagnosis="angioma"))
    args = melanoma.get_args(argv(data, run))
    train, _ = melanoma.read_data(args, melanoma.Hooks(args, None), lambda *a: None)
    assert "code" not in train.columns
    (data / "train.csv").write_bytes(table)
    info = json.loads((run / "tiny_fold0.json").read_text())
    for part in (info["args"], info["run"], info):
        part.pop("target", None)
    info.pop("classes")
    (run / "tiny_fold0.json").write_text(json.dumps(info))
    melanoma.main(argv(data, run, "--epochs", "1", "--tta", "0", "--name", "tiny"))
    assert "finished already with these settings" in capsys.readouterr().out


def test_diagnosis_codes_map_names_and_codes_and_melanoma_logit_is_the_log_odds(tiny_data):
    values = pd.Series(["melanoma", " Nevus", "lentigo NOS", "solar lentigo", "seborrheic keratosis",
                        "lichenoid keratosis", "cafe-au-lait macule", "atypical melanocytic proliferation", "unknown",
                        "bcc", "UNK", "DF"])
    assert melanoma.diagnosis_codes(values, "t").tolist() == ["MEL", "NV", "BKL", "BKL", "BKL", "BKL", "UNK", "UNK",
                                                              "UNK", "BCC", "UNK", "DF"]
    with pytest.raises(melanoma.DataError) as e:
        melanoma.diagnosis_codes(pd.Series(["nevus", "angioma", "wart"]), "train file x.csv")
    assert all(s in str(e.value) for s in ("x.csv: row 3", "'angioma'", "MEL, NV", "UNK", "lentigo NOS"))
    train = pd.read_csv(tiny_data / "train.csv")  # the demo's diagnoses agree with its targets
    assert ((train["diagnosis"] == "melanoma") == (train["target"] == 1)).all()
    benign = train.loc[train["target"] == 0, "diagnosis"]
    assert benign.nunique() >= 4 and set(benign) <= set(melanoma.COMPETITION_DIAGNOSES)
    assert (melanoma.demo_diagnoses(train["target"], seed=0) == train["diagnosis"]).all()  # its own stream
    torch.manual_seed(0)
    logits = torch.randn(5, 4) * 3
    for mel in range(4):
        classes = ["NV"] * mel + ["MEL"] + ["NV"] * (3 - mel)
        assert torch.allclose(torch.sigmoid(melanoma.melanoma_logit(logits, classes)), torch.softmax(logits, 1)[:, mel],
                              atol=1e-6)
    two = logits[:, :2]
    assert torch.allclose(melanoma.melanoma_logit(two, ["MEL", "NV"]), two[:, 0] - two[:, 1])  # 2: the binary logit
    assert torch.equal(melanoma.melanoma_logit(logits[:, :1]), logits[:, 0])
    cpu, x = SimpleNamespace(device=torch.device("cpu")), torch.zeros(5, 3, 2, 2)
    y, yb = torch.tensor([0, 3, 1, 2, 0]), torch.tensor([1.0, 0, 0, 1, 0])
    loss = melanoma.batch_loss(lambda x: logits, lambda x: x, x, y, cpu)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    loss = melanoma.batch_loss(lambda x: logits[:, :1], lambda x: x, x, yb, cpu)
    assert loss == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], yb)))


@needs_shared
def test_every_real_diagnosis_maps_and_agrees_with_its_target():
    train = pd.read_csv(SHARED / "train.csv", dtype=str, keep_default_na=False)
    ensemble.check_numbers(train, {"target": "0 or 1"}, "train.csv")
    melanoma.check_diagnoses(train, "train.csv")
    assert train["code"].value_counts().to_dict() == {"UNK": 27126, "NV": 5193, "MEL": 584, "BKL": 223}


# ---- Starting weights: --weights, --init-from -----------------------------------------------------

def test_weights_load_safely_and_init_from_fits_every_fold_first(tmp_path, tiny_data, run, capsys):
    torch.manual_seed(1)
    src = net()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        loaded = weights_into(net(), tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    save_file(backbone.state_dict(), tmp_path / "b.safetensors")
    model = weights_into(net(), tmp_path / "b.safetensors")
    assert torch.equal(model.backbone.conv_stem.weight, backbone.conv_stem.weight) and model.head.out_features == 1
    with pytest.raises(melanoma.DataError, match="does not fit"):
        weights_into(net("test_resnet"), tmp_path / "b.safetensors", "test_resnet")
    save_file({k: v.contiguous() for k, v in net("test_resnet").state_dict().items()}, run / "tiny_fold1.safetensors")
    refused(argv(tiny_data, run, "--init-from", "tiny", "--fold", "0", "1", "--name", "big"), capsys,
            "tiny_fold1.safetensors", "does not fit")
    refused(argv(tiny_data, run, "--init-from", "tiny", "--fold", "2", "--name", "big"), capsys,
            "--init-from tiny", "tiny_fold2.safetensors", "fold 2")
    assert not list(run.glob("big*"))
    melanoma.main(argv(tiny_data, run, "--epochs", "1", "--tta", "0", "--head", "mlp", "--init-from", "tiny",
                       "--name", "mlp"))
    log = capsys.readouterr().out
    assert "the body loads; " in log and "head.weight there only" in log and "another --head" in log


WEIGHTS_REFUSALS = [  # (content, words): a --weights file is data, never code
    (lambda p: torch.save({"model": Evil()}, p), "refused, it holds pickled objects"),
    (lambda p: p.write_bytes(b"\x80\x04K\x01."), "not a weights file"),
    (lambda p: torch.save(torch.zeros(3), p), "holds no state dict"),
    (lambda p: p.mkdir(), "a folder, not a file"),
    (lambda p: torch.save(net("test_resnet").state_dict(), p), "does not fit"),
]


@pytest.mark.parametrize("content, message", WEIGHTS_REFUSALS)
def test_bad_weights_files_are_one_line_before_training(tiny_data, tmp_path, capsys, content, message):
    content(tmp_path / "w.pt")
    refused(argv(tiny_data, tmp_path / "out", "--weights", tmp_path / "w.pt"), capsys, "--weights", "w.pt", message)


# ---- Hair and --augs ------------------------------------------------------------------------------

def test_augs_files_build_kornias_stack_and_hair_draws_thin_strands(tiny_data, tmp_path, capsys):
    (tmp_path / "augs.yaml").write_text(melanoma.DEFAULT_AUGS)
    from_file = melanoma.Augment.build(melanoma.read_augs(tmp_path / "augs.yaml"), melanoma.OWN_AUGS)
    assert [repr(m) for m in from_file] == [repr(m) for m in melanoma.Augment(MEAN, STD).random]
    hair = melanoma.Augment.build(yaml.safe_load("- name: Hair\n  p: 0.3\n- name: RandomVerticalFlip\n"),
                                  melanoma.OWN_AUGS)
    assert isinstance(hair[0], melanoma.Hair) and hair[0].p == 0.3 and isinstance(hair[1], K.RandomVerticalFlip)
    with_hair = melanoma.aug_entries(melanoma.get_args(["--hair", "0.2"]))
    assert [e["name"] for e in with_hair] == ["RandomAffine", "RandomHorizontalFlip", "ColorJitter", "Hair"]
    for name, extra in (("plain", []), ("file", ["--augs", tmp_path / "augs.yaml"])):
        melanoma.main(argv(tiny_data, tmp_path / "out", "--epochs", "1", "--tta", "1", "--name", name, *extra))
    for kind in ("oof", "test"):
        assert (tmp_path / "out" / f"plain_fold0_{kind}.csv").read_bytes() == \
            (tmp_path / "out" / f"file_fold0_{kind}.csv").read_bytes()
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["name"].tolist() == ["plain", "file"]
    assert f"--augs {tmp_path / 'augs.yaml'}" in runs["settings"][1] and "--augs" not in runs["settings"][0]
    (tmp_path / "augs.yaml").write_text("- name: RandomGaussianNoise\n  std: 1.0e+30\n  p: 1.0\n")  # a NaN loss
    refused(argv(tiny_data, tmp_path / "out", "--augs", tmp_path / "augs.yaml"), capsys, "loss is", "augs.yaml")
    x = torch.rand(16, 3, 40, 56)
    assert melanoma.Hair(p=0)(x) is x
    a, b = (seeded((1,), lambda: melanoma.Hair(p=1)(x)) for _ in range(2))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    white = torch.ones(64, 3, 64, 64)
    haired = seeded((2,), lambda: melanoma.Hair(p=1)(white))
    changed = (haired < 1).any(1)  # (images, pixels): where a strand darkened the image
    assert changed.flatten(1).any(1).all()  # p=1: every image gets hair
    assert 0.005 < changed.float().mean() < 0.2 and haired.amin() < 0.3  # thin strands, dark at the core
    half = seeded((2,), lambda: melanoma.Hair(p=0.5)(white))
    assert 16 < int((half < 1).flatten(1).any(1).sum()) < 48
    follows = [seeded((4,), lambda: (melanoma.Hair(p=p)(x), torch.rand(3))[1]) for p in (0.1, 0.9)]
    assert torch.equal(*follows)  # the draws after hair do not depend on p


AUGS_REFUSALS = [  # (YAML, words): refused up front, in one line, and fast
    (None, ["nothere.yaml", "no such file"]),
    ("- name: RandomAffine\n  degrees: [1, 2\n", ["augs.yaml", "not YAML"]),
    ("name: RandomAffine\n", ["augs.yaml", "not a list", "dict"]),
    ("- degrees: 180\n", ["entry 1", "needs a name"]),
    ("- name: RandomHorizontalFlip\n- name: RandomAfine\n  degrees: 3\n",
     ["entry 2 (RandomAfine)", "not a 2D augmentation", "did you mean RandomAffine"]),
    ("- name: ColorJitter\n  brightnes: 0.1\n", ["entry 1 (ColorJitter)", "bad arguments", "brightnes"]),
    ("- name: RandomHorizontalFlip\n  p: 2\n", ["entry 1 (RandomHorizontalFlip)", "p 2 is a probability"]),
    ("- name: Hair\n  p: -0.5\n", ["entry 1 (Hair)", "it must be in [0, 1]"]),
    ("- name: Hair\n  most: 1000000\n", ["bad arguments"]),
    ("- name: Resize\n  size: [16, 16]\n", ["entry 1 (Resize)", "must keep the shape"]),
    ("- name: RandomHorizontalFlip\n  p: .nan\n", ["not a finite number"]),
    ("- name: Normalize\n  mean: [0, 0, 0]\n  std: [0, 0, 0]\n", ["not finite"]),
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
     'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n', ["aliases"]),  # a billion laughs
    ("- name: RandomHorizontalFlip\n" * 10000, ["larger than 65536 bytes"]),
    ("- {name: RandomHorizontalFlip}\n" * 1000, ["at most 100 augmentations", "1000"]),
    ("[" + ",".join(["{name: RandomHorizontalFlip}"] * 101) + "]", ["at most 100 augmentations"]),
]


@pytest.mark.parametrize("text, names", AUGS_REFUSALS)
def test_bad_augs_files_are_one_line_up_front(tiny_data, tmp_path, capsys, text, names):
    path = tmp_path / ("nothere.yaml" if text is None else "augs.yaml")
    if text is not None:
        path.write_text(text)
    start = time.time()
    refused(argv(tiny_data, tmp_path / "out", "--augs", path), capsys, "--augs", *names)
    assert time.time() - start < 30 and not (tmp_path / "out").exists()


# ---- The cache ------------------------------------------------------------------------------------

def test_the_cache_hits_is_renewed_by_a_changed_source_and_remakes_a_damaged_entry(tmp_path, monkeypatch):
    src, cache = tmp_path / "a.jpg", tmp_path / "cache"
    smooth_image(400, 300, seed=1).save(src, quality=95)
    first = melanoma.cached_load(str(src), 64, str(cache))
    entry, = cache.iterdir()
    assert first.shape == (64, 64, 3) and np.abs(first.astype(int) - melanoma.load_image(str(src), 64)).mean() < 2
    real_load = melanoma.load_image
    monkeypatch.setattr(melanoma, "load_image", lambda p, size: pytest.fail("cache miss") if p == str(src)
                        else real_load(p, size))
    assert np.array_equal(melanoma.cached_load(str(src), 64, str(cache)), first)
    monkeypatch.undo()
    entry.write_text("image_name,target\nx,0.5\n")  # as ensemble.py --out once wrote over one
    assert np.array_equal(melanoma.cached_load(str(src), 64, str(cache)), first)
    smooth_image(400, 300, seed=2).save(src, quality=95)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = melanoma.cached_load(str(src), 64, str(cache))
    assert not np.array_equal(changed, first) and len(list(cache.iterdir())) == 2


# ---- Plots and the ledger -------------------------------------------------------------------------

def test_plots_progressive_resizing_and_the_ledger_ranked_by_concatenated_oof(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = argv(tiny_data, out, "--fold", "0", "1", "--epochs", "1", "--tta", "1")
    melanoma.main(base + ["--name", "small", "--hair", "0.5", "--frac", "0.5"])
    for fold in (0, 1):
        assert is_png(out / f"small_fold{fold}_curves.png") and is_png(out / f"small_fold{fold}_roc.png")
    assert json.loads((out / "small_fold0.json").read_text())["augmentations"][-1].startswith("Hair(p=0.5")
    # progressive resizing: each fold starts from the same fold's weights; a near-zero rate keeps them
    melanoma.main(base + ["--name", "big", "--size", "48", "--init-from", "small", "--lr-min", "1e-12", "--lr-max",
                          "1e-12"])
    small = [load_file(out / f"small_fold{k}.safetensors")["backbone.conv_stem.weight"] for k in (0, 1)]
    big = [load_file(out / f"big_fold{k}.safetensors")["backbone.conv_stem.weight"] for k in (0, 1)]
    assert torch.allclose(big[0], small[0], atol=1e-6) and torch.allclose(big[1], small[1], atol=1e-6)
    assert not torch.allclose(big[0], small[1], atol=1e-3)
    runs = pd.read_csv(out / "runs.csv")
    assert runs[["name", "fold"]].values.tolist() == [["small", 0], ["small", 1], ["big", 0], ["big", 1]]
    assert "--hair 0.5" in runs["settings"][0] and "--init-from small" in runs["settings"][2]
    capsys.readouterr()
    melanoma.main(["--runs", str(out)])
    said = capsys.readouterr().out
    oof = pd.concat([pd.read_csv(out / f"small_fold{k}_oof.csv") for k in (0, 1)])
    row = next(line for line in said.splitlines() if line.startswith("small "))
    assert row.split()[1] == "0,1" and row.split()[2] == f"{roc_auc_score(oof['target'], oof['pred']):.4f}"
    assert f"--size 512 --fold 0 1 --name small_512 --init-from small --out {out}" in said
    small_rerun = next(line for line in said.splitlines() if "--name small_512" in line)
    assert "--frac" not in small_rerun and "--epochs" not in small_rerun  # the full-scale run: all data, 20 epochs
    assert "--init-from small --size 512" not in said  # the earlier --init-from is replaced
    r, oofs = np.random.default_rng(0), {}
    for name, folds in (("a", (0, 1)), ("b", (0,))):
        for k in folds:
            t = r.integers(0, 2, 40)
            pred = (t * 0.5 + r.random(40)) * (0.2 if k else 1.0)  # fold 1 on another scale: CV below the mean
            oofs[name, k] = pd.DataFrame(dict(image_name=[f"{name}{k}_{i}" for i in range(40)], target=t, pred=pred))
            oofs[name, k].assign(fold=k).to_csv(tmp_path / f"{name}_fold{k}_oof.csv", index=False)
            auc = roc_auc_score(t, pred)
            row = dict(date="2026-01-01 00:00:00", name=name, fold=k, oof_auc=auc, oof_auc_no_tta=auc - 0.01,
                       wall_s=10.0, settings="--demo --size 48", out=str(tmp_path))
            if (name, k) == ("a", 0):  # an earlier, overwritten run of the same fold: the latest row counts
                melanoma.append_run(tmp_path / "runs.csv", {**row, "oof_auc": 0.1})
            melanoma.append_run(tmp_path / "runs.csv", row)
    table = ensemble.summarise_runs(ensemble.read_ledger(tmp_path / "runs.csv"), tmp_path)
    both = pd.concat([oofs["a", 0], oofs["a", 1]])
    a = table.set_index("name").loc["a"]
    assert a["folds"] == "0,1" and a["auc"] == pytest.approx(roc_auc_score(both["target"], both["pred"]))
    assert a["mean_fold_auc"] == pytest.approx(np.mean([roc_auc_score(o["target"], o["pred"])
                                                         for o in (oofs["a", 0], oofs["a", 1])]))
    assert table["auc"].is_monotonic_decreasing
    ledger = made(tmp_path / "many") / "runs.csv"
    row = dict(date="d", name="x, with a comma", fold=0, oof_auc=0.5, oof_auc_no_tta=0.5, wall_s=1.0,
               settings="--size 48", out="o")
    with multiprocessing.get_context("spawn").Pool(4) as pool:  # fork could copy a held lock
        pool.starmap(melanoma.append_run, [(ledger, {**row, "fold": i}) for i in range(200)])
    many = pd.read_csv(ledger)
    assert sorted(many["fold"]) == list(range(200)) and (many["name"] == "x, with a comma").all()
    assert ledger.read_text().count("date,name") == 1
    path = tmp_path / "cut.csv"
    path.write_text(LEDGER_ROW + "0.8,0.7,1.0,--size 48,o")  # no final newline
    melanoma.append_run(path, dict(row, name="b"))
    assert ensemble.read_ledger(path)["name"].tolist() == ["a", "b"]

    class FullDisk(io.FileIO):  # the disk fills up halfway through the row
        def write(self, b):
            super().write(b[:len(b) // 2])
            raise OSError(28, "No space left on device")

    before = path.read_bytes()
    with mock.patch.object(ensemble, "open", lambda p, mode, buffering: FullDisk(p, mode), create=True):
        with pytest.raises(ensemble.DataError, match=r"cannot append to the ledger \(No space left on device\)"):
            melanoma.append_run(path, dict(row, name="c"))
    assert path.read_bytes() == before  # whole, as it was: half a row would stop every later run


LEDGER_REFUSALS = [  # (content, words): --runs refuses a ledger it cannot read right
    (None, ["ledger", "runs.csv", "no such file"]), ("", ["ledger", "runs.csv", "cannot read it as CSV"]),
    (LEDGER_ROW.split("\n")[0] + "\n", ["runs.csv", "no rows"]), ("date,name\nx,y\n", ["runs.csv", "missing column(s) fold"]),
    (LEDGER_ROW + "high,0.5,1,,o\n", ["runs.csv", "row 2", "oof_auc must be a finite number"]),
    (LEDGER_ROW + "inf,0.5,1,,o\n", ["row 2", "oof_auc must be a finite number or empty, got 'inf'"]),
    (LEDGER_ROW + "0.8,0.7,1.0,--size 4", ["row 2", "out is empty"]),
    (LEDGER_ROW + '0.8,0.7,1.0,"--name \'x",o\n', ["row 2", "unbalanced quote"]),
    (LEDGER_ROW + "0.8,0.7,1.0,--size 4,o,extra\n", ["row 2: more fields than the header's 8", "cannot read it as CSV"]),
]


@pytest.mark.parametrize("content, names", LEDGER_REFUSALS)
def test_bad_ledgers_are_one_line(tmp_path, capsys, content, names):
    if content is not None:
        (tmp_path / "runs.csv").write_text(content)
    refused(["--runs", tmp_path], capsys, *names)


# ---- Trackers -------------------------------------------------------------------------------------

def tensorboard_run(folder):
    """A TensorBoard run folder as TensorBoard reads it (every event kept, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    run.Reload()
    return run


def scalars(run, tag):
    return [e.step for e in run.Scalars(tag)], np.array([e.value for e in run.Scalars(tag)])


def check_fold_run(run, info, batch):
    """The fold's run logs each step's loss once and the JSON's epoch figures, OOF AUCs and plots where they fall."""
    epochs = info["epochs"]
    per_epoch = -(-epochs[0]["images"] // batch)
    last = len(epochs) * per_epoch - 1
    steps, loss = scalars(run, "train/loss")
    assert steps == list(range(last + 1))
    for e, h in enumerate(epochs):  # the epoch's loss is the mean of its steps' losses, over images
        sizes = [len(b) for b in np.array_split(np.arange(h["images"]), per_epoch)]
        assert np.average(loss[e * per_epoch:(e + 1) * per_epoch], weights=sizes) == pytest.approx(h["loss"], rel=1e-5)
    for tag, key in (("val/auc", "val_auc"), ("train/lr", "lr"), ("train/images_per_s", "images_per_s"),
                     ("train/epoch_loss", "loss")):
        steps, values = scalars(run, tag)
        assert steps == [(e + 1) * per_epoch - 1 for e in range(len(epochs))]
        assert values == pytest.approx([h[key] for h in epochs], rel=1e-5)
    assert scalars(run, "oof/auc") == ([last], pytest.approx([info["oof_auc"]]))
    assert scalars(run, "oof/auc_no_tta") == ([last], pytest.approx([info["oof_auc_no_tta"]]))
    assert [(e.step, e.width > 200) for tag in ("curves", "roc") for e in run.Images(tag)] == [(last, True)] * 2
    return loss


def test_tensorboard_logs_steps_once_lr_range_tests_and_grad_cam(tiny_data, tmp_path, monkeypatch, trained, capsys):
    out = tmp_path / "out"
    save = melanoma.Extras.epoch

    def keep_the_first_epochs_checkpoint(self, fold, *a):
        save(self, fold, *a)
        if not (tmp_path / "epoch1.pt").exists():
            shutil.copy(melanoma.fold_file(self.args, fold, "_last.pt"), tmp_path / "epoch1.pt")

    monkeypatch.setattr(melanoma.Extras, "epoch", keep_the_first_epochs_checkpoint)
    args = argv(tiny_data, out, "--name", "t", "--log-with", "tensorboard")
    melanoma.main(args)
    loss = check_fold_run(tensorboard_run(out / "logs" / "t_fold0"), json.loads((out / "t_fold0.json").read_text()), 16)
    # a run killed at the worst moment: epoch 2 logged to its end, but only epoch 1's checkpoint saved
    (out / "t_fold0.json").unlink()
    shutil.copy(tmp_path / "epoch1.pt", out / "t_fold0_last.pt")
    melanoma.main(args + ["--resume"])
    info = json.loads((out / "t_fold0.json").read_text())
    assert check_fold_run(tensorboard_run(out / "logs" / "t_fold0"), info, 16) == pytest.approx(loss, abs=1e-6)
    hparams = list((out / "logs" / "t_fold0").glob("*/hparams.yml"))
    assert hparams and "lr_max: 0.003" in hparams[0].read_text() and "fold: 0" in hparams[0].read_text()
    out = tmp_path / "lr"
    melanoma.main(argv(tiny_data, out, "--lr-find", "--lr-find-steps", "20", "--name", "t", "--log-with",
                       "tensorboard"))
    assert sorted(p.name for p in out.iterdir()) == ["logs", "t_lr_find.csv", "t_lr_find.png"]
    curve, run = pd.read_csv(out / "t_lr_find.csv"), tensorboard_run(out / "logs" / "t_lr_find")
    for column in ("loss", "smoothed", "lr"):
        steps, values = scalars(run, f"lr_find/{column}")
        assert steps == curve["step"].tolist() and values == pytest.approx(curve[column].to_numpy(), rel=1e-5)
    assert [e.step for e in run.Images("lr_find")] == [curve["step"].iloc[-1]]
    shutil.copytree(trained, out, dirs_exist_ok=True)
    melanoma.main(["--explain", "1", "--name", "tiny", "--out", str(out), "--num-workers", "0", "--log-with",
                   "tensorboard"])
    with Image.open(out / "tiny_fold0_explain.png") as im:
        assert [(e.width, e.height) for e in tensorboard_run(out / "logs" / "tiny_fold0").Images("explain")] == [im.size]
    import importlib.util as found
    from accelerate.utils import LoggerType
    names = melanoma.tracker_names(melanoma.get_args(["--log-with", "all"]))
    assert "tensorboard" in names and names == [str(t) for t in melanoma.get_available_trackers()]
    assert melanoma.tracker_names(melanoma.get_args([])) is None
    seen = {}
    fake = SimpleNamespace(init_trackers=lambda run, config, kwargs: seen.update(config=config))
    melanoma.start_tracking(fake, "r", values={"a": [1, "b"], "b": None, "c": 2.5})
    assert seen["config"] == {"a": '[1, "b"]', "b": None, "c": 2.5}  # TensorBoard's hparams take no lists
    absent = [t for t in LoggerType.list()[1:] if found.find_spec(t) is None]
    if absent:
        refused(argv(tiny_data, tmp_path / "none", "--log-with", "tensorboard", absent[0]), capsys,
                f"--log-with {absent[0]}: not installed", f"pip install {absent[0]}")
    monkeypatch.setattr(melanoma, "get_available_trackers", lambda: [])
    refused(argv(tiny_data, tmp_path / "none", "--log-with", "all"), capsys, "--log-with all", "pip install tensorboard")
    assert not (tmp_path / "none").exists()


# ---- Using a trained model: --predict and --explain -----------------------------------------------

def test_predict_gives_the_runs_own_numbers_and_reads_images_as_meant(tiny_data, run, tmp_path, capsys):
    ours = predict(run, tiny_data / "test.csv", "--tta", "0")
    assert "30 images, 1 fold(s) averaged" in capsys.readouterr().out
    theirs = pd.read_csv(run / "tiny_fold0_test.csv")
    assert list(ours.columns) == ["image_name", "fold0", "target"] and ours["image_name"].equals(theirs["image_name"])
    assert np.array_equal(ours["fold0"].to_numpy(), theirs["target"].to_numpy())  # exactly
    assert np.array_equal(ours["target"].to_numpy(), theirs["target"].to_numpy())
    folder = tmp_path / "clinic"
    (folder / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "jpeg" / "test").iterdir())[:3]):
        shutil.copy(src, folder / "a" / f"img{i}.jpg")
    Image.open(first_image(tiny_data, "test")).save(folder / "photo.PNG")
    (folder / "notes.txt").write_text("not an image")
    pred = predict(run, folder, "--tta", "2", "--explain", "1")
    assert pred["image_name"].tolist() == ["a/img0.jpg", "a/img1.jpg", "a/img2.jpg", "photo.PNG"]
    assert pred["target"].between(0, 1).all()
    with Image.open(run / "tiny_fold0_explain.png") as im:
        assert im.format == "PNG" and im.size[1] > im.size[0]  # one row per case: 1 FP, 1 FN, 1 new
    assert "Grad-CAM of 3 images" in capsys.readouterr().out
    # Test and training images in one CSV; a 16-bit PNG; a phone's sideways JPEG, upright by its EXIF.
    test, train = (pd.read_csv(tiny_data / f)["image_name"] for f in ("test.csv", "train.csv"))
    csv_of(tmp_path / "new.csv", image_name=[test[0], train[0], test[1]], fold0=0.5)
    (run / "tiny_fold0_explain.png").unlink()
    pred = predict(run, tmp_path / "new.csv", "--data-dir", tiny_data, "--tta", "0", "--explain", "1")
    assert pred["image_name"].tolist() == [test[0], train[0], test[1]] and pred["fold0"].ne(0.5).all()
    assert (run / "tiny_fold0_explain.png").is_file()
    photos = made(tmp_path / "photos")
    image = Image.open(first_image(tiny_data, "test"))
    grey = np.asarray(image.convert("L"))
    Image.fromarray(grey).save(photos / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(photos / "sixteen.png")
    image.save(photos / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.transpose(Image.Transpose.ROTATE_90).save(photos / "sideways.jpg", exif=exif, quality=95)
    scores = predict(run, photos, "--tta", "0").set_index("image_name")["target"]
    assert scores["sixteen.png"] == pytest.approx(scores["eight.png"], abs=1e-6)
    assert scores["sideways.jpg"] == pytest.approx(scores["upright.jpg"], abs=2e-3)


def test_predict_names_every_bad_image_and_grad_cam_peaks_on_the_lesion(tiny_data, run, tmp_path, capsys):
    empty = made(tmp_path / "empty")
    base = ["--out", run, "--num-workers", "0", "--tta", "0"]
    refused(["--predict", empty, "--name", "nobody", *base], capsys, "--name nobody", "nobody_fold{k}.safetensors")
    refused(["--predict", empty, "--name", "tiny", *base], capsys, "--predict", "no images")
    bad = made(tmp_path / "bad")
    shutil.copy(first_image(tiny_data, "test"), bad / "good.jpg")
    (bad / "broken.jpg").write_bytes(first_image(tiny_data, "test").read_bytes()[:200])
    (bad / "empty.png").write_bytes(b"")
    smooth_image(64, 48).save(bad / "cut.png")
    (bad / "cut.png").write_bytes((bad / "cut.png").read_bytes()[:-40])
    (bad / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (bad / "loop.jpg").symlink_to(bad / "loop.jpg")
    made(bad / "dir.jpg")
    refused(["--predict", bad, "--name", "tiny", *base], capsys, "6 image(s) cannot be used", "broken.jpg",
            "cut.png", "--skip-bad")
    assert not (run / "tiny_predict.csv").exists()
    assert predict(run, bad, "--tta", "0", "--skip-bad")["image_name"].tolist() == ["good.jpg"]
    skipped = pd.read_csv(run / "tiny_predict_skipped.tsv", sep="\t")
    assert sorted(skipped["image_name"]) == ["broken.jpg", "cut.png", "dir.jpg", "empty.png", "gone.jpg", "loop.jpg"]
    assert "not a complete PNG" in skipped.set_index("image_name")["reason"]["cut.png"]
    with mock.patch.object(melanoma.tempfile, "TemporaryFile", side_effect=PermissionError(13, "Denied")):
        refused(["--explain", "1", "--name", "tiny", "--out", run], capsys, "--out", "cannot write in")
    assert not list(run.glob("*_explain.png"))
    info = json.loads((run / "tiny_fold0.json").read_text())
    info["args"]["size"] = info["run"]["size"] = 64
    (run / "tiny_fold3.json").write_text(json.dumps(info))
    shutil.copy(run / "tiny_fold0.safetensors", run / "tiny_fold3.safetensors")
    refused(["--predict", bad, "--name", "tiny", *base], capsys, "tiny_fold3.safetensors", "different models", "size")
    image = torch.full((1, 3, 64, 64), 230, dtype=torch.uint8)
    image[:, :, 40:56, 8:24] = 20  # a dark lesion in the lower left
    augment = melanoma.Augment((0, 0, 0), (1, 1, 1))
    model = melanoma.ExtrasNet(DarkSpot())
    torch.nn.init.ones_(model.head.weight)
    probs, cam = melanoma.grad_cam(model, augment, image)
    assert cam.shape == (1, 64, 64) and float(cam.max()) == pytest.approx(1) and float(cam.min()) >= 0
    peak = divmod(int(cam[0].argmax()), 64)
    assert 40 <= peak[0] < 56 and 8 <= peak[1] < 24 and cam[0, 40:56, 8:24].mean() > 5 * cam[0, :16, 40:].mean()
    assert 0 < float(probs[0]) < 1
    model = melanoma.ExtrasNet(DarkSpot(), outputs=3)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[4.0], [0.0], [-4.0]]))  # output 0 rises with darkness
        model.head.bias.zero_()
        softmax = torch.softmax(model(augment(image, random=False)), 1)
    probs, cam = melanoma.grad_cam(model, augment, image, classes=["MEL", "NV", "BKL"])
    assert 40 <= divmod(int(cam[0].argmax()), 64)[0] < 56 and float(probs[0]) == pytest.approx(float(softmax[0, 0]), abs=1e-6)
    probs, cam = melanoma.grad_cam(model, augment, image, classes=["NV", "BKL", "MEL"])  # falls with darkness
    assert float(probs[0]) == pytest.approx(float(softmax[0, 2]), abs=1e-6) and float(cam.max()) == 0


@pytest.mark.parametrize("output, extra", [("tiny_predict.csv", []), ("tiny_predict_skipped.tsv", []),
                                           ("tiny_fold0_explain.png", ["--explain", "1"])])
def test_predict_and_explain_outputs_that_are_folders_are_refused_up_front(tiny_data, run, capsys, output, extra):
    (run / output).mkdir()
    refused(["--predict", tiny_data / "test.csv", "--name", "tiny", "--out", run, "--tta", "0", *extra], capsys,
            output, "a folder where an output file goes")
    assert not (run / "tiny_predict.csv").is_file()


class DarkSpot(torch.nn.Module):
    """A backbone whose one feature map is each pixel's darkness: Grad-CAM must light up the dark lesion."""
    num_features = 1
    pretrained_cfg = dict(mean=(0, 0, 0), std=(1, 1, 1))

    def forward_features(self, x):
        return torch.nn.functional.avg_pool2d(1 - x.mean(1, keepdim=True), 4)

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


# ---- Tools: folds, the demo, the LR range test; signals and pipes ---------------------------------

def test_committed_folds_are_the_published_groups_and_the_benchmark_times_each_stage(tmp_path, capsys, monkeypatch):
    folds = pd.read_csv(ROOT / "folds.csv")
    assert list(folds.columns) == ["image_name", "patient_id", "target", "fold"]
    assert len(folds) == 33126 and folds["image_name"].is_unique and (folds["fold"] == -1).sum() == 434
    used = folds[folds["fold"] >= 0]
    assert (used.groupby("patient_id")["fold"].nunique() == 1).all() and sorted(used["fold"].unique()) == [0, 1, 2, 3, 4]
    per_fold = used.groupby("fold")["target"].sum()
    assert per_fold.max() - per_fold.min() <= 6
    df = pd.DataFrame(dict(image_name=[f"i{t}" for t in range(-1, 20)], patient_id=[f"p{t}" for t in range(-1, 20)],
                           target=0, tfrecord=range(-1, 20)))
    five = melanoma.make_folds(df, 5)
    assert five["fold"].tolist()[:16] == [-1, 2, 1, 0, 3, 0, 0, 4, 4, 3, 2, 1, 3, 2, 1, 4]  # published
    assert five["fold"].tolist()[16:] == [t % 5 for t in range(15, 20)]
    assert melanoma.make_folds(df.iloc[:16], 3)["fold"].tolist() == [-1] + [t % 3 for t in range(15)]
    df.to_csv(tmp_path / "t.csv", index=False)
    melanoma.main(["--make-folds", str(tmp_path / "t.csv"), "--out", str(tmp_path / "f.csv")])
    assert "21 images, 21 patients, 1 left out (fold -1)" in capsys.readouterr().out
    def small_jpegs(folder):  # the originals' 6000x4000 photos take seconds to make: a tenth of their sides
        for name, (w, h) in (("6000x4000", (600, 400)), ("6000x4000_noisy", (600, 400)), ("1872x1053", (187, 105))):
            smooth_image(w, h).save(os.path.join(folder, f"{name}.jpg"), quality=90)
        return {os.path.join(folder, f"{name}.jpg"): 0.1 for name in ("6000x4000", "6000x4000_noisy", "1872x1053")}

    monkeypatch.setattr(melanoma, "benchmark_jpegs", small_jpegs)
    melanoma.main(["--benchmark", *TINY, "--batch-size", "4", "--cpu"])
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("benchmark: cpu") and "--size 32 --model test_efficientnet --batch-size 4" in said[0]
    for stage in ("(a) loading", "mix, 44 %", "(b) augmentation stack", "(c) training step, bare", "whole step, reading --cache",
                  "(d) TTA x2, decode once", "peak memory: process"):
        assert sum(line.lstrip().startswith(stage) for line in said) == 1, stage


@needs_shared
def test_committed_folds_are_those_of_the_real_metadata_byte_for_byte(tmp_path):
    train, folds = pd.read_csv(SHARED / "train.csv"), pd.read_csv(ROOT / "folds.csv")
    assert folds["image_name"].tolist() == train["image_name"].tolist()
    assert ((folds["fold"] == -1) == (train["tfrecord"] == -1)).all() and (folds["target"] == train["target"]).all()
    melanoma.main(["--make-folds", str(SHARED / "train.csv"), "--out", str(tmp_path / "f.csv")])
    assert (tmp_path / "f.csv").read_bytes() == (ROOT / "folds.csv").read_bytes()


def synthetic_train(n_patients=200, seed=0):
    r, rows = np.random.default_rng(seed), []
    for p in range(n_patients):
        risky = r.random() < 0.15
        for _ in range(r.integers(1, 30)):
            rows.append((f"img{len(rows)}", f"p{p}", int(risky and r.random() < 0.3)))
    return pd.DataFrame(rows, columns=["image_name", "patient_id", "target"])


@pytest.mark.parametrize("n_folds", [3, 5, 7])
def test_make_folds_without_tfrecords_groups_patients_stratifies_and_balances(n_folds):
    df = synthetic_train()
    folds = melanoma.make_folds(df, n_folds, seed=1)
    assert folds["image_name"].tolist() == df["image_name"].tolist()
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all() and sorted(folds["fold"].unique()) == list(range(n_folds))
    pos, size = folds.groupby("fold")["target"].sum(), folds.groupby("fold").size()
    assert pos.max() - pos.min() <= folds.groupby("patient_id")["target"].sum().max()
    assert size.max() - size.min() <= folds.groupby("patient_id").size().max()
    a, b, c = (melanoma.make_folds(df, 5, seed=s) for s in (3, 3, 4))
    assert a.equals(b) and not a["fold"].equals(c["fold"])


FOLDS_REFUSALS = [  # (change of the train file, flags, words)
    (lambda d: d.drop(columns="image_name"), [], ["missing column(s) image_name"]),
    (lambda d: d.drop(columns="patient_id"), [], ["patient_id"]), (lambda d: d.drop(columns="target"), [], ["target"]),
    (lambda d: pd.concat([d, d.iloc[:1]]), [], ["duplicate image_name img0"]),
    (lambda d: d.assign(target=d["target"].replace(1, 2)), [], ["target must be 0 or 1"]),
    (lambda d: d.assign(patient_id=[""] + list(d["patient_id"][1:])), [], ["row 2", "patient_id is empty"]),
    (lambda d: d.assign(tfrecord=[np.nan] + [1] * (len(d) - 1)), [], ["row 2", "tfrecord"]),
    (lambda d: d, ["--n-folds", "5"], ["5 folds but only 4 patients"]),
    (lambda d: d, ["--out", "{t}"], ["--out", "a folder, not a file"]),
    (lambda d: d, ["--out", "{t}/keep.csv"], ["exists", "--overwrite"]),
    (lambda d: d, ["--out", "{t}/t.csv", "--overwrite"], ["is the train file itself"]),
]


@pytest.mark.parametrize("change, flags, names", FOLDS_REFUSALS)
def test_make_folds_refuses_bad_tables_and_keeps_a_users_file(tmp_path, capsys, change, flags, names):
    change(synthetic_train(20 if "--n-folds" not in flags else 4)).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "keep.csv").write_text("keep me")
    refused(["--make-folds", tmp_path / "t.csv", "--out", tmp_path / "f.csv", *[f.format(t=tmp_path) for f in flags]],
            capsys, *names)
    assert not (tmp_path / "f.csv").exists() and (tmp_path / "keep.csv").read_text() == "keep me"


def lr_curve(shape, sigma, seed=0, steps=200):
    """A synthetic range test over 1e-7 to 1: loss = shape(log10 rate) + gaussian noise."""
    lr = np.logspace(-7, 0, steps)
    loss = shape(np.log10(lr)) + np.random.default_rng(seed).normal(0, sigma, steps)
    return pd.DataFrame(dict(step=np.arange(1, steps + 1), lr=lr, loss=loss))


def falls_at(x, centre, depth=0.4):
    """A fall of `depth` from 0.69 (a guess of 0.5), fastest at the rate 10**centre."""
    return 0.69 - depth / (1 + np.exp(-(x - centre) / 0.3))


@pytest.mark.parametrize("seed", range(5))
def test_lr_verdict_on_a_clean_valley_picks_within_2x_of_the_fastest_fall(seed):
    curve = lr_curve(lambda x: falls_at(x, -3) + 0.5 * np.exp((x + 0.5) / 0.25), 0.05, seed)  # diverges past 0.1
    r = melanoma.read_lr_curve(curve, entropy=0.62)
    assert r["verdict"] == "valley" and 5e-4 <= r["lr_max"] <= 2e-3 and r["lr_min"] == pytest.approx(r["lr_max"] / 40)
    assert r["fall"][0] < 1e-3 < r["fall"][1]
    line = melanoma.verdict_line(r)
    assert line.startswith(f"valley: suggested --lr-min {r['lr_min']:.1e} --lr-max {r['lr_max']:.1e}") and "\n" not in line


def test_lr_verdicts_and_noise_band_and_ctrl_c_and_a_closed_pipe_stop_in_one_line(accelerator, tiny_data, trained,
                                                                                  tmp_path):
    decades = np.array([0.679, 0.678, 0.671, 0.660, 0.707, 0.675, 0.813])  # a real flat curve, noise 0.12
    for seed in range(5):
        r = melanoma.read_lr_curve(lr_curve(lambda x: decades[np.clip((x + 7).astype(int), 0, 6)], 0.12, seed),
                                   entropy=melanoma.class_mix_entropy([1] * 32 + [0] * 68))
        assert r["verdict"] == "flat" and r["lr_max"] is None and r["lr_min"] is None and r["fall"] is None
        line = melanoma.verdict_line(r)
        assert line.startswith("flat: ") and "suggested" not in line and "\n" not in line
        assert all(f in line for f in ("--lr-find-steps", "--batch-size", "--lr-find-batches"))
    assert melanoma.class_mix_entropy([0, 1]) == pytest.approx(np.log(2))
    assert melanoma.class_mix_entropy([1] * 32 + [0] * 68) == pytest.approx(0.627, abs=1e-3)
    assert melanoma.class_mix_entropy([0, 1, 2, 3, 3, 2]) == pytest.approx(-(np.log(1 / 6) + 2 * np.log(1 / 3)) / 3)
    shallow = lr_curve(lambda x: falls_at(x, -3, depth=0.05) + np.exp((x + 0.5) / 0.25), 0.03)  # 0.69 -> 0.64
    assert melanoma.read_lr_curve(shallow)["verdict"] == "valley"  # it falls clearly from its start ...
    assert melanoma.read_lr_curve(shallow, entropy=0.64)["verdict"] == "flat"  # ... to the class mix, no lower
    r = melanoma.read_lr_curve(lr_curve(lambda x: falls_at(x, -0.5), 0.05), entropy=0.62)
    assert r["verdict"] == "still falling" and 1e-7 < r["lr_max"] < 1
    assert (v := melanoma.verdict_line(r)).startswith("still falling: suggested") and "a higher --lr-find-end" in v
    # a non-finite loss that ended the test early is a divergence, however low the last finite loss
    assert melanoma.read_lr_curve(lr_curve(lambda x: falls_at(x, -0.5), 0.05), 0.62, diverged=True)["verdict"] == "valley"
    lrs = np.logspace(-7, 0, 200)  # the second rule: a tenth of the rate at the lowest smoothed loss
    u = pd.DataFrame(dict(lr=lrs, smoothed=(np.log10(lrs) + 2) ** 2))
    assert melanoma.suggest_lrs(u) == pytest.approx((1e-3 / 40, 1e-3, 1e-2), rel=0.05)
    loss = np.random.default_rng(0).normal(0.7, 0.1, 400)
    loss[-5:] = 50  # diverged
    loss[200:] += np.random.default_rng(1).normal(0, 0.2, 200)  # learnt: the loss scatters more
    smoothed, se, noise = melanoma.noise_band(loss)
    assert smoothed[100] == pytest.approx(loss[80:121].mean()) and se[100] == pytest.approx(noise[100] / np.sqrt(41))
    assert noise[100] == pytest.approx(0.1, rel=0.2) and noise[300] == pytest.approx(np.hypot(0.1, 0.2), rel=0.2)
    assert se[0] == pytest.approx(noise[0] / np.sqrt(21)) and noise[-30] < 0.5  # not inflated by the diverged steps
    args = melanoma.get_args(["--lr-find", *TINY, "--lr-find-end", "1e9", "--lr-find-steps", "60"])
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = ((torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)) for _ in range(60))
    targets = torch.tensor(np.random.default_rng(0).integers(0, 2, 8), dtype=torch.float32)
    curve = melanoma.lr_range_test(model, melanoma.Augment(MEAN, STD), batches, targets, accelerator, args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    smoothed = curve["loss"].ewm(alpha=0.02).mean()  # the stopping rule's average, bias-corrected
    assert len(curve) < 60 and smoothed.iloc[-1] > 4 * smoothed.min()
    p = subprocess.Popen([sys.executable, "melanoma.py", *argv(tiny_data, tmp_path / "out", "--epochs", "200")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "out").glob("*_last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("stopped:") and "--resume" in err
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    for command in ([ROOT / "melanoma.py", "--runs", trained], [ROOT / "ensemble.py", *A, "--out", "sub.csv"]):
        p = subprocess.Popen([sys.executable, *map(str, command)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # `--runs | head`: the reader is gone before the first line; ensemble.py wrote its files
        err = p.stderr.read()
        assert p.wait() in (0, 1) and "Traceback" not in err and "Exception" not in err, err
    assert (tmp_path / "sub.csv").is_file()


@pytest.mark.parametrize("extra", [[], ["--meta"], ["--target", "diagnosis"]])
def test_lr_find_writes_its_curve_and_verdict_with_trainings_model(tiny_data, tmp_path, capsys, monkeypatch, extra):
    built = []
    model = melanoma.Extras.model
    monkeypatch.setattr(melanoma.Extras, "model", lambda *a, **kw: built.append(model(*a, **kw)) or built[-1])
    out = tmp_path / "out"
    melanoma.main(argv(tiny_data, out, "--lr-find", "--lr-find-steps", "30", "--lr-find-batches", "2", "--name", "t",
                       *extra))
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["t_lr_find.csv", "t_lr_find.png"]  # no weights, no ledger
    curve = pd.read_csv(out / "t_lr_find.csv")
    assert list(curve.columns) == ["step", "lr", "loss", "smoothed", "band_low", "band_high"]
    assert 10 <= len(curve) <= 30 and curve["lr"].iloc[0] == pytest.approx(1e-7)
    assert np.allclose(np.diff(np.log(curve["lr"])), np.log(1e7) / 29)  # 1e-7 to 1 in 30 steps
    assert (curve["band_low"] < curve["smoothed"]).all() and (curve["smoothed"] < curve["band_high"]).all()
    verdict = said.removeprefix("lr-find: ").split(":")[0]
    assert verdict in ("valley", "flat", "still falling") and "steps up to" in said and is_png(out / "t_lr_find.png")
    if verdict != "flat":
        assert curve["lr"].min() <= float(said.split("--lr-max ")[1].split(",")[0]) <= curve["lr"].max()
    raw_model = built[0][0]
    assert (raw_model.meta is not None) == ("--meta" in extra)
    assert raw_model.head.out_features == (4 if "diagnosis" in extra else 1)


# ---- ensemble.py: reading prediction files, blending, the report ----------------------------------

Y = [0, 1, 0, 1, 0, 0]
A = ["a_fold0_oof.csv", "a_fold0_test.csv"]


def write_model(d, name, folds, test, rows=None):
    """OOF files {name}_fold{k}_oof.csv from {k: (targets, preds)} and test files from test preds."""
    start = 0
    for k, (y, p) in folds.items():
        names = rows[start:start + len(y)] if rows else [f"img{start + i}" for i in range(len(y))]
        csv_of(d / f"{name}_fold{k}_oof.csv", image_name=names, target=y, pred=p, fold=k)
        csv_of(d / f"{name}_fold{k}_test.csv", image_name=[f"t{i}" for i in range(len(test))], target=test)
        start += len(y)


def ensemble_in(d, capsys, *args, code=0):
    """ensemble.py run in-process in folder d: its stdout; or, for code 2, its one stderr line, nothing written."""
    before = sorted(d.rglob("*"))
    with contextlib.chdir(d), (pytest.raises(SystemExit) if code else contextlib.nullcontext()) as e:
        ensemble.main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code:
        assert e.value.code == code and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert sorted(d.rglob("*")) == before
    return err if code else out


def blend(d, capsys, *args, code=0):
    """ensemble.py on every CSV in d (as `preds/*.csv` passes them) into sub.csv."""
    files = sorted(p.name for p in d.glob("*.csv") if p.name != "sub.csv")
    return ensemble_in(d, capsys, *files, "--out", "sub.csv", "--bootstrap", "200", *args, code=code)


def report_of(d, name="sub"):
    return json.loads((d / f"{name}.json").read_text())


def test_mean_and_rank_match_hand_computed_values_and_the_cv_auc_is_over_the_concatenated_oof(tmp_path, capsys):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.1, 0.4, 0.3, 0.2])
    write_model(tmp_path, "b$_$", {0: (Y, [.2, .6, .1, .8, .7, .3])}, [0.8, 0.1, 0.5, 0.3])  # mathtext in a name
    blend(tmp_path, capsys)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["image_name"].tolist() == ["t0", "t1", "t2", "t3"] and np.allclose(sub["target"], [.45, .25, .4, .25])
    said = blend(tmp_path, capsys, "--method", "rank")
    # ranks a: 1,4,3,2 and b: 4,1,3,2 -> means 2.5, 2.5, 3, 2 -> rescaled to [0, 1]
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], [0.5, 0.5, 1, 0])
    report = report_of(tmp_path)
    assert report["models"]["a"]["auc"] == pytest.approx(1.0) and report["models"]["b$_$"]["auc"] == pytest.approx(.875)
    assert report["ensemble"]["mean"]["auc"] == pytest.approx(1.0)  # mean .15 .75 .15 .75 .5 .35
    assert "CV AUC" in said and "Pearson / Spearman" in said and "and sub_correlation.png" in said
    assert is_png(tmp_path / "sub_correlation.png")
    write_model(cv := made(tmp_path / "cv"), "m", {0: ([0, 0, 1], [.1, .2, .3]), 1: ([0, 0, 1], [.6, .7, .8])}, [0.5])
    csv_of(cv / "ids.txt", image_name=[f"img{i}" for i in range(6)], patient_id=[f"p{i // 2}" for i in range(6)])
    said = blend(cv, capsys, "--folds", "ids.txt")
    info = report_of(cv)["models"]["m"]
    assert info["auc"] == pytest.approx(0.75) and info["folds"] == [0, 1]
    assert report_of(cv)["bootstrap_over"] == "patients" and "patient ids from ids.txt" in said
    csv_of(cv / "some.txt", image_name=["img0", "img1"], patient_id=["p0", "p0"])
    assert "some OOF images have no patient_id" in blend(cv, capsys, "--folds", "some.txt")
    made(cv / "no_ids.txt", "image_name,fold\nimg0,0\n")
    assert "no_ids.txt has no patient_id column" in blend(cv, capsys, "--folds", "no_ids.txt")
    assert report_of(cv)["bootstrap_over"] == "images"
    r = np.random.default_rng(2)
    y, p = (r.random(500) < 0.1).astype(float), np.round(r.random(500), 2)
    assert ensemble.auc(y, p) == pytest.approx(roc_auc_score(y, p))  # ties included
    p = p + 0.3 * y
    by_image = ensemble.bootstrap_interval(y, p, np.arange(500), 500)
    by_patient = ensemble.bootstrap_interval(y, p, np.repeat(np.arange(50), 10), 500)
    assert by_image[0] < ensemble.auc(y, p) < by_image[1] and by_patient[0] < by_patient[1]


def test_weighted_stack_rank_and_nested_scores_and_a_report_without_nan(tmp_path, capsys):
    r = np.random.default_rng(0)
    y = (r.random(400) < 0.2).astype(int)
    good, noise, test_good, test_noise = np.clip(0.3 * y + 0.7 * r.random(400), 0, 1), r.random(400), r.random(50), \
        r.random(50)
    folds = {k: slice(k * 100, (k + 1) * 100) for k in range(4)}
    write_model(tmp_path, "good", {k: (y[s], good[s]) for k, s in folds.items()}, test_good)
    write_model(tmp_path, "noise", {k: (y[s], noise[s]) for k, s in folds.items()}, test_noise)
    blend(tmp_path, capsys, "--method", "weighted")
    w = dict(zip(report_of(tmp_path)["models"], report_of(tmp_path)["ensemble"]["weighted"]["weights"]))
    assert w["good"] > 0.8 and sum(w.values()) == pytest.approx(1)
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], w["good"] * test_good + w["noise"] * test_noise)
    blend(tmp_path, capsys, "--method", "stack")
    from sklearn.linear_model import LogisticRegression
    names = list(report_of(tmp_path)["models"])
    X = np.column_stack([{"good": good, "noise": noise}[n] for n in names])
    Z = np.column_stack([{"good": test_good, "noise": test_noise}[n] for n in names])
    ref = LogisticRegression(C=1.0).fit(ensemble.logit(X), y).predict_proba(ensemble.logit(Z))[:, 1]
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], ref, atol=1e-6)
    r = np.random.default_rng(1)  # nested CV reports no gain for a blend fitted on noise
    y, X, folds = (r.random(3000) < 0.1).astype(int), r.random((3000, 6)), np.arange(3000) % 5
    singles = [ensemble.auc(y, X[:, j]) for j in range(6)]
    for method in ("weighted", "stack"):
        in_sample = ensemble.auc(y, ensemble.fit(method, X, y)[0](X))
        nested = ensemble.auc(y, ensemble.nested_oof(method, X, y, folds))
        assert nested < in_sample and nested < max(singles) + 0.01 and nested < 0.53
    assert ensemble.auc(y, ensemble.fit("weighted", X, y)[0](X)) > max(singles)  # in-sample it would "gain"
    logits = [2.0, -3.0, 0.5, 7.0]
    write_model(lg := made(tmp_path / "lg"), "a", {0: (Y, [-2, 3, -1, 1, 0, .5]), 1: (Y, [-2, 2, -1, 1, 0, .5])}, logits)
    said = blend(lg, capsys, "--method", "rank")
    sub = pd.read_csv(lg / "sub.csv")["target"].to_numpy()
    assert np.array_equal(np.argsort(sub), np.argsort(logits)) and sub.min() == 0 and sub.max() == 1
    assert report_of(lg)["ensemble"]["rank"]["auc"] == pytest.approx(1.0)
    assert "outside [0, 1]" in report_of(lg)["ensemble"]["mean"]["note"] and "outside [0, 1]" in said
    err = blend(lg, capsys, code=2)
    assert "a_fold0_oof.csv: pred ranges over [-2, 3], not probabilities" in err and "--method rank" in err
    d = made(lg / "one_class")
    write_model(d, "a", {0: ([0, 0, 0], [.1, .2, .3])}, [0.5, 0.5])  # one class, a constant test file
    write_model(d, "b", {0: ([0, 0, 0], [.3, .1, .2])}, [0.2, 0.4])
    blend(d, capsys, "--bootstrap", "0")
    report = json.loads((d / "sub.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert report["models"]["a"]["auc"] is None and report["models"]["a"]["ci95"] == [None, None]
    assert report["pearson"]["a"]["b"] is None


def test_plain_submissions_models_on_other_images_runs_without_test_files_and_files_left_out(tmp_path, capsys):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    write_model(tmp_path, "b", {0: (Y, [.2, .6, .1, .8, .5, .3])}, [0.6, 0.8])
    assert "different OOF images" in blend(tmp_path, capsys)
    report = report_of(tmp_path)
    assert report["models"]["a"]["n_oof"] == 12 and report["correlation_on"].startswith("OOF predictions of 6")
    csv_of(tmp_path / "public.csv", image_name=["t1", "t0"], target=[0.9, 0.1])
    assert "no OOF (test only)" in blend(tmp_path, capsys)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["image_name"].tolist() == ["t0", "t1"] and np.allclose(sub["target"], [.3, (.4 + .8 + .9) / 3])
    assert "public" in blend(tmp_path, capsys, "--method", "weighted", code=2)
    (tmp_path / "public.csv").unlink()
    for f in sorted(tmp_path.glob("b_*.csv")):
        f.rename(tmp_path / f.name.replace("fold0", "fold1"))
    csv_of(tmp_path / "b_fold1_oof.csv", image_name=[f"img{i}" for i in range(6, 12)], target=Y,
           pred=[.2, .6, .1, .8, .7, .3], fold=1)
    (tmp_path / "a_fold1_oof.csv").unlink()
    assert "not scored: the models share no OOF images" in blend(tmp_path, capsys)
    assert "share no OOF images" in blend(tmp_path, capsys, "--method", "stack", code=2)
    for f in tmp_path.glob("*_test.csv"):
        f.unlink()
    (tmp_path / "sub.csv").unlink()
    said = blend(tmp_path, capsys)
    assert "no submission: model(s) a, b have no test predictions among the files" in said
    assert not (tmp_path / "sub.csv").exists() and report_of(tmp_path)["models"]["a"]["auc"] is not None
    write_model(kept := made(tmp_path / "kept"), "m", {0: (Y, [0.1, 0.9, 0.2, 0.8, 0.3, 0.4])}, [0.5, 0.6])
    melanoma.append_run(kept / "runs.csv", dict(date="d", name="m", fold=0, oof_auc=1.0, oof_auc_no_tta=1.0,
                                                    wall_s=1.0, settings="", out="o"))
    (kept / "runs.csv").write_bytes(b"\xef\xbb\xbf" + (kept / "runs.csv").read_bytes())  # Excel's CSV UTF-8
    csv_of(kept / "m_lr_find.csv", step=[1], lr=[1e-7], loss=[0.7], smoothed=[0.7], band_low=[.6], band_high=[.8])
    said = blend(kept, capsys)
    assert "left out runs.csv: melanoma.py's ledger of runs" in said and "m  " in said
    assert "left out m_lr_find.csv: melanoma.py's LR range test" in said and (kept / "sub.csv").exists()
    assert "only melanoma.py's ledger or LR range tests" in ensemble_in(kept, capsys, "runs.csv", "m_lr_find.csv",
                                                                        code=2)


def test_patient_ids_from_the_runs_folds_file_writes_by_umask_and_no_torch(tmp_path, capsys):
    project, elsewhere = made(tmp_path / "project"), made(tmp_path / "elsewhere")
    preds = made(project / "preds")
    ids = pd.DataFrame(dict(image_name=[f"img{i}" for i in range(12)], patient_id=[f"p{i // 3}" for i in range(12)]))
    ids.to_csv(made(project / "data") / "folds.csv", index=False)

    def write_run(name, k, folds):
        (preds / f"{name}_fold{k}.json").write_text(json.dumps(dict(fold=k, args=dict(folds=str(folds)))))

    for name in "ab":
        write_model(preds, name, {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.2, .6, .1, .8, .7, .3])}, [0.2, 0.4])
        for k in (0, 1):
            write_run(name, k, "data/folds.csv")  # relative to project/, where the runs started
    files = sorted(preds.glob("*.csv"))

    def patients(*args):
        ensemble_in(elsewhere, capsys, *files, "--out", tmp_path / "out" / "sub.csv", "--bootstrap", "50", *args)
        report = report_of(tmp_path / "out")
        return report["patient_ids"] if report["bootstrap_over"] == "patients" else report["notes"][0]

    assert patients() == f"patient ids from {project / 'data' / 'folds.csv'}, recorded by the runs"
    ids.to_csv(elsewhere / "mine.csv", index=False)
    assert patients("--folds", "mine.csv") == "patient ids from mine.csv, given by --folds"
    write_run("b", 1, elsewhere / "mine.csv")
    assert patients().startswith(f"the runs record different folds files: {project / 'data' / 'folds.csv'}")
    ids.to_csv(elsewhere / "folds.csv", index=False)
    assert patients() == "patient ids from folds.csv, in the current folder"
    (preds / "a_fold0.json").write_text("{")
    assert "a_fold0.json: cannot read the run's JSON" in ensemble_in(elsewhere, capsys, *files, code=2)
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            ensemble.new_file_mode.cache_clear()
            ensemble_in(tmp_path, capsys, *A, "--out", f"out{umask}/sub.csv", "--bootstrap", "0")
        finally:
            os.umask(old)
            ensemble.new_file_mode.cache_clear()
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / f"out{umask}").iterdir()} == {mode}
    code = ("import sys; sys.modules['fcntl'] = None; import ensemble; "
            "print('torch' in sys.modules, 'sklearn' in sys.modules); ensemble.main(['--help'])")
    done = run_cli("-c", code)
    assert done.returncode == 0 and done.stdout.split()[:2] == ["False", "False"], done.stderr
    assert "Blend prediction files" in done.stdout


def two_recipes(d):
    write_model(d, "a", {1: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4], rows=[f"img{i}" for i in range(6, 12)])
    for k, size in ((0, 32), (1, 48)):  # fold 0 at 32 px, fold 1 at 48 px, copied together under one name
        (d / f"a_fold{k}.json").write_text(json.dumps(dict(fold=k, args={}, run=dict(size=size, lr_max=1e-3))))


def x_file(kind, **cols):
    """A setup: model x's fold 0 file of the kind (oof, test) holding the columns."""
    return lambda d: csv_of(d / f"x_fold0_{kind}.csv", **cols)


def folds_file(text, *args):
    return lambda d: [*A, "--folds", made(d / "f.csv", text), *args]


ENSEMBLE_REFUSALS = [  # (setup of folder d, which holds model a's fold 0; the arguments; words)
    (None, [*A, "absent.csv"], "absent.csv: no such file"),
    (lambda d: (d / "a_fold0_test.csv").write_bytes(b"\xff\xfe\x00garbage\x00"), None, "a_fold0_test.csv"),
    (lambda d: made(d / "x_fold0_test.csv"), None, "x_fold0_test.csv: is a folder"),
    (x_file("test", image_name=["t0", "t1"], pred=[.1, .2]), None, "missing column(s) target"),
    (x_file("test", image_name=[], target=[]), None, "x_fold0_test.csv: a header and no rows"),
    (x_file("test", image_name=["t0", "t0"], target=[.1, .2]), None, "x_fold0_test.csv: row 3: duplicate image_name t0"),
    (x_file("test", image_name=["t0", ""], target=[.1, .2]), None, "row 3: image_name is empty"),
    (x_file("test", image_name=["t0 ", "t1"], target=[.1, .2]), None, "row 2: image_name 't0 ' has surrounding spaces"),
    (x_file("test", image_name=["t0", "t9"], target=[.1, .2]), None, "different test images: x_fold0_test.csv lacks t1"),
    (x_file("test", image_name=["t0", "t1"], target=[.1, np.nan]), None, "x_fold0_test.csv: row 3: target"),
    (x_file("test", image_name=["t0", "t1"], target=[.1, 1.2]), None, "target ranges over [0.1, 1.2]"),
    (x_file("oof", image_name=["img0"], target=[0], pred=[np.inf], fold=0), None, "x_fold0_oof.csv: row 2: pred"),
    (x_file("oof", image_name=["img0"], target=[2], pred=[.5], fold=0), None, "row 2: target must be 0 or 1, got '2'"),
    (x_file("oof", image_name=["img0"], target=[0], pred=[.5], fold=[1.5]), None,
     "x_fold0_oof.csv: row 2: fold must be a whole number, got '1.5'"),
    (x_file("oof", image_name=["img0", "img1"], target=[0, 1], pred=[-2.5, 3], fold=0), None,
     "x_fold0_oof.csv: pred ranges over [-2.5, 3], not probabilities in [0, 1] (--method rank takes any scores)"),
    (lambda d: csv_of(d / "a_fold5_oof.csv", image_name=["img0"], target=[0], pred=[.5], fold=5), None, "overlap on image img0"),
    (x_file("oof", image_name=["img1"], target=[0], pred=[.5], fold=0), None, "img1 disagrees"),
    (lambda d: shutil.copy(d / "a_fold0_oof.csv", made(d / "b")), None, "and b/a_fold0_oof.csv: the same"),
    (lambda d: pd.read_csv(d / "a_fold0_oof.csv").to_csv(d / "a_fold0_oof (1).csv", quoting=1, index=False), None,
     "a_fold0_oof (1).csv: holds OOF predictions"),  # its names quoted, as R's write.csv writes them
    (lambda d: shutil.copy(d / "a_fold0_test.csv", d / "a_fold0_test (1).csv"), None, "named like a run's prediction"),
    (lambda d: shutil.copy(d / "a_fold0_oof.csv", d / "a_fold0_oof (1).csv"), None,  # a browser's second download
     "a_fold0_oof (1).csv: holds OOF predictions (columns pred, fold) but is not named {name}_fold{k}_oof.csv"),
    (two_recipes, None, "a_fold0.json and a_fold1.json: one model name, two recipes (they differ in size)"),
    (None, [*A, "a_fold0_oof.csv"], "a_fold0_oof.csv and a_fold0_oof.csv: the same file name twice"),
    (None, [*A, "--bootstrap", "-1"], "argument --bootstrap: must be 0 or more, got -1"),
    (None, [*A, "--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    (None, ["absent_fold0_oof.csv", "--out", "sub.json"], "--out sub.json: the report goes beside"),
    (None, lambda d: [*A, "--out", made(d / "o")], "o: a folder, not a file"),
    (None, lambda d: [*A, "--out", made(d / "sub.json") / ".." / "sub.csv"], "sub.json: a folder, not a file"),
    (None, lambda d: [*A, "--out", made(d / "f", "") / "out" / "sub.csv"], "f is a file, not a folder"),
    (None, [*A, "--out", "a_fold0_test.csv"], "--out a_fold0_test.csv: would overwrite the input"),
    (None, [*A, "--out", ""], "argument --out: empty"), (None, [*A, "--out", "."], "--out '.': give a file"),
    (None, lambda d: [*A, "--out", (os.mkfifo(d / "pipe.csv"), "pipe.csv")[1]], "pipe.csv: not a regular file"),
    (None, lambda d: [*A, "--folds", made(d / "f").name], "folds file f: is a folder"),
    (None, folds_file("image_name,patient_id\nimg0,p0\nimg1,\n"), "f.csv: row 3: patient_id is empty"),
    (None, folds_file("image_name,patient_id\nimg0,p0\nimg0,p1\n"), "f.csv: row 3: duplicate image_name img0"),
    (None, folds_file('image_name,patient_id\n"img0,p0\n'), "f.csv: cannot read it as CSV"),
    (None, folds_file("image_name,patient_id\nimg0,p0\n", "--out", "f.csv"), "would overwrite the input"),
    *[(None, [*A, "--out", out], f"{Path(out).name} is the name of a file melanoma.py writes")
      for out in ("a_fold1.csv", "b_fold2_oof.csv", "runs.csv", "preds/m_predict.csv", "m_lr_find.csv", "folds.csv",
                  "m_fold0_explain.csv", "preds/logs", "RUNS.csv", "ISIC_0052212_64_0123456789abcdef.jpg")],  # --cache
]


@pytest.mark.parametrize("setup, args, words", ENSEMBLE_REFUSALS)
def test_bad_prediction_files_flags_and_outputs_are_one_line_and_write_nothing(tmp_path, capsys, setup, args, words):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    if setup:
        setup(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.csv"))
    args = args(tmp_path) if callable(args) else args or [*files, "--out", "out/sub.csv"]
    assert words in ensemble_in(tmp_path, capsys, *args, code=2)
