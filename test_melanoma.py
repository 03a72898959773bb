"""Tests of melanoma.py and ensemble.py: `pytest test_melanoma.py` (a few minutes on 2 CPU cores).

Tiny timm test models, tiny generated images, --no-pretrained; the real ISIC 2020 metadata in
../shared/isic2020 is used where present and skipped where not.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ensemble
import melanoma

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "isic2020"
TINY = ["--model", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "2", "--batch-size", "16",
        "--tta", "2", "--num-workers", "0", "--lr-max", "3e-3"]
needs_shared = pytest.mark.skipif(not (SHARED / "train.csv").exists(), reason="../shared/isic2020 is absent")


def run_cli(*args, env=None, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic competition dataset in the official layout: ~160 training images, 30 test images."""
    return melanoma.make_demo_data(tmp_path_factory.mktemp("data") / "d", n_patients=32, n_test=30, shape=(48, 64))


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of tiny_data that a test may break."""
    return Path(shutil.copytree(tiny_data, tmp_path / "d"))


def net(name="test_efficientnet", **shape):
    """A fresh model as training builds it, with the extras' options (ExtrasNet)."""
    return melanoma.ExtrasNet(melanoma.Net.timm_backbone(name, False), **shape)


def weights_into(model, path, name="test_efficientnet"):
    melanoma.load_weights(model, melanoma.read_weights(path)[0], f"--weights {path}", name)
    return model


def train_args(data, out, *extra):
    return ["--data-dir", data, "--folds", Path(data) / "folds.csv", "--out", out, *TINY, *map(str, extra)]


# ----------------------------------------------------------------------------------------------
# folds.csv and make_folds

def test_committed_folds_are_patient_grouped_and_stratified():
    folds = pd.read_csv(ROOT / "folds.csv")
    assert list(folds.columns) == ["image_name", "patient_id", "target", "fold"]
    assert len(folds) == 33126 and folds["image_name"].is_unique
    used = folds[folds["fold"] >= 0]
    assert (used.groupby("patient_id")["fold"].nunique() == 1).all()
    assert sorted(used["fold"].unique()) == [0, 1, 2, 3, 4]
    per_fold = used.groupby("fold")["target"].sum()
    assert per_fold.max() - per_fold.min() <= 6
    assert (folds["fold"] == -1).sum() == 434


@needs_shared
def test_committed_folds_match_the_real_metadata():
    train = pd.read_csv(SHARED / "train.csv")
    folds = pd.read_csv(ROOT / "folds.csv")
    assert folds["image_name"].tolist() == train["image_name"].tolist()
    assert ((folds["fold"] == -1) == (train["tfrecord"] == -1)).all()
    assert (folds["target"] == train["target"]).all() and (folds["patient_id"] == train["patient_id"]).all()


@needs_shared
def test_make_folds_cli_reproduces_folds_csv_byte_for_byte(tmp_path):
    r = run_cli("melanoma.py", "--make-folds", SHARED / "train.csv", "--out", tmp_path / "f.csv")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f.csv").read_bytes() == (ROOT / "folds.csv").read_bytes()


def synthetic_train(n_patients=200, seed=0):
    r = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        risky = r.random() < 0.15
        for _ in range(r.integers(1, 30)):
            rows.append((f"img{len(rows)}", f"p{p}", int(risky and r.random() < 0.3)))
    return pd.DataFrame(rows, columns=["image_name", "patient_id", "target"])


@pytest.mark.parametrize("n_folds", [3, 5, 7])
def test_make_folds_without_tfrecord_groups_stratifies_and_balances(n_folds):
    df = synthetic_train()
    folds = melanoma.make_folds(df, n_folds, seed=1)
    assert folds["image_name"].tolist() == df["image_name"].tolist()
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == list(range(n_folds))
    pos = folds.groupby("fold")["target"].sum()
    assert pos.max() - pos.min() <= folds.groupby("patient_id")["target"].sum().max()
    size = folds.groupby("fold").size()
    assert size.max() - size.min() <= folds.groupby("patient_id").size().max()


def test_make_folds_is_deterministic_per_seed():
    df = synthetic_train()
    a, b, c = (melanoma.make_folds(df, 5, seed=s) for s in (3, 3, 4))
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_make_folds_with_tfrecord_maps_groups():
    df = pd.DataFrame(dict(image_name=[f"i{t}" for t in range(-1, 15)], patient_id=[f"p{t}" for t in range(-1, 15)],
                           target=0, tfrecord=range(-1, 15)))
    five = melanoma.make_folds(df, 5)
    assert five["fold"].tolist() == [-1, 2, 1, 0, 3, 0, 0, 4, 4, 3, 2, 1, 3, 2, 1, 4]
    assert melanoma.make_folds(df, 3)["fold"].tolist() == [-1] + [t % 3 for t in range(15)]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.drop(columns="image_name"), "image_name"),
    (lambda d: d.drop(columns="patient_id"), "patient_id"),
    (lambda d: d.drop(columns="target"), "target"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "duplicate image_name img0"),
    (lambda d: d.assign(target=d["target"].replace(1, 2)), "target must be 0 or 1"),
])
def test_make_folds_cli_errors(tmp_path, capsys, change, message):
    change(synthetic_train()).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit) as e:  # in-process: the same path as the command, 7 s faster
        melanoma.main(["--make-folds", str(tmp_path / "t.csv"), "--out", str(tmp_path / "f.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "f.csv").exists()


def test_make_folds_more_folds_than_patients(tmp_path, capsys):
    synthetic_train(4).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit) as e:
        melanoma.main(["--make-folds", str(tmp_path / "t.csv"), "--out", str(tmp_path / "f.csv"), "--n-folds", "5"])
    assert e.value.code == 2 and "5 folds but only 4 patients" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


# ----------------------------------------------------------------------------------------------
# Sampler

def test_sampler_keeps_positives_and_never_repeats_a_negative_before_all_are_seen():
    targets = np.array([1] * 7 + [0] * 50)
    per_epoch = melanoma.EpochSampler.per_pool(targets, epochs=4)
    assert per_epoch == 13  # the smallest count whose 4 epochs cover all 50 benign images
    epochs = [melanoma.EpochSampler.indices(targets, per_epoch, seed=0, epoch=e) for e in range(12)]
    for e, idx in enumerate(epochs):
        assert len(idx) == len(set(idx)) == 7 + 13
        assert set(range(7)) <= set(idx)
        assert sorted(idx[idx >= 7] - 7) == sorted(melanoma.EpochSampler.negatives(50, 13, 0, e))
    stream = np.concatenate([melanoma.EpochSampler.negatives(50, 13, 0, e) for e in range(12)])
    for k in range(0, len(stream) - 50, 50):  # draws k..k+49 are all 50 negatives, once each
        assert sorted(stream[k:k + 50]) == list(range(50))
    assert set(epochs[0]) != set(epochs[1])


def test_sampler_is_deterministic_and_keyed_on_seed_and_epoch():
    targets = np.array([1] * 5 + [0] * 40)
    a = melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=3)
    assert np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=3))
    assert not np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=2, epoch=3))
    assert not np.array_equal(a, melanoma.EpochSampler.indices(targets, 10, seed=1, epoch=4))


def test_neg_ratio_sets_the_negatives_per_epoch():
    targets = np.array([1] * 10 + [0] * 100)
    assert melanoma.EpochSampler.per_pool(targets, 20, neg_ratio=3) == 30
    assert melanoma.EpochSampler.per_pool(targets, 20, neg_ratio=50) == 100


@pytest.mark.parametrize("n_neg, batch, world", [(41, 4, 2), (40, 8, 2), (33, 5, 3), (30, 64, 1)])
def test_sampler_ranks_are_disjoint_and_cover_the_single_process_epoch(n_neg, batch, world):
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
        assert len(flat) == len(set(flat))
        assert sorted(flat) == sorted(i for b in single for i in b)
        assert sorted(flat) == sorted(melanoma.EpochSampler.indices(targets, 15, 0, epoch))


# ----------------------------------------------------------------------------------------------
# Augmentation and TTA

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_augment_shape_dtype_range_and_seeded_draws():
    aug = melanoma.Augment(MEAN, STD, cutout=True)
    x = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    with melanoma.seeded(0):
        a = aug(x)
    with melanoma.seeded(0):
        b = aug(x)
    with melanoma.seeded(1):
        c = aug(x)
    assert a.shape == (8, 3, 40, 40) and a.dtype == torch.float32
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (a.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (a.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    plain = aug(x, random=False)
    expected = (x.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(plain, expected, atol=1e-6)


def test_seeded_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with melanoma.seeded(9):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


def test_tta_zero_is_a_plain_forward_and_tta_averages_seeded_views():
    torch.manual_seed(0)
    model = net().eval()
    aug = melanoma.Augment(MEAN, STD)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = melanoma.predict_batch(model, aug, x, 0, (7,))
        assert torch.allclose(plain, torch.sigmoid(model(aug(x, random=False))).squeeze(1))
        views = []
        for v in range(3):
            with melanoma.seeded(7, v):
                views.append(torch.sigmoid(model(aug(x))).squeeze(1))
        tta = melanoma.predict_batch(model, aug, x, 3, (7,))
    assert torch.allclose(tta, torch.stack(views).mean(0), atol=1e-6)
    assert not torch.allclose(tta, plain)


# ----------------------------------------------------------------------------------------------
# Data: layouts, images, cache

def test_layout_detection(tmp_path):
    (tmp_path / "a" / "jpeg" / "train").mkdir(parents=True)
    (tmp_path / "a" / "train.csv").write_text("image_name,target\n")
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "train.csv").write_text("image_name,target\n")
    assert melanoma.layout_of(tmp_path / "a") == (tmp_path / "a/jpeg/train", tmp_path / "a/jpeg/test")
    assert melanoma.layout_of(tmp_path / "b") == (tmp_path / "b/train", tmp_path / "b/test")
    assert melanoma.layout_of(tmp_path) is None


def smooth_image(w, h, seed=0):
    small = np.random.default_rng(seed).integers(0, 256, (h // 50, w // 50, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def test_load_image_is_close_to_a_full_decode(tmp_path):
    smooth_image(1600, 1000).save(tmp_path / "a.jpg", quality=92)
    out = melanoma.load_image(str(tmp_path / "a.jpg"), 96)
    full = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB").resize((96, 96), Image.BILINEAR))
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - full).mean() < 3
    with Image.open(tmp_path / "a.jpg") as im:  # the reduced-size decode is really taken
        assert im.draft("RGB", (96, 96))[1][2:] != (1600, 1000)


def test_load_image_other_formats_and_errors(tmp_path):
    smooth_image(200, 100).save(tmp_path / "a.png")
    out = melanoma.load_image(str(tmp_path / "a.png"), 50)
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "a.png").convert("RGB").resize((50, 50), Image.BILINEAR)))
    smooth_image(200, 100).save(tmp_path / "b.jpg")
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    for name in ("b.jpg", "c.jpg"):
        with pytest.raises(melanoma.DataError, match=name):
            melanoma.load_image(str(tmp_path / name), 50)


def test_cache_hits_and_is_invalidated_by_a_changed_source(tmp_path, monkeypatch):
    src, cache = tmp_path / "a.jpg", tmp_path / "cache"
    smooth_image(400, 300, seed=1).save(src, quality=95)
    first = melanoma.cached_load(str(src), 64, str(cache))
    assert len(list(cache.iterdir())) == 1 and first.shape == (64, 64, 3)
    assert np.abs(first.astype(int) - melanoma.load_image(str(src), 64)).mean() < 2
    real_load = melanoma.load_image
    monkeypatch.setattr(melanoma, "load_image", lambda p, size: pytest.fail("cache miss") if p == str(src)
                        else real_load(p, size))
    assert np.array_equal(melanoma.cached_load(str(src), 64, str(cache)), first)
    smooth_image(400, 300, seed=2).save(src, quality=95)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    monkeypatch.setattr(melanoma, "load_image", real_load)
    changed = melanoma.cached_load(str(src), 64, str(cache))
    assert not np.array_equal(changed, first) and len(list(cache.iterdir())) == 2


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("old")

    def crash(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        melanoma.atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.csv"]


# ----------------------------------------------------------------------------------------------
# Model weights

class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_files_load_safely(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    src = net()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        loaded = weights_into(net(), tmp_path / f)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(melanoma.DataError, match="refused"):
        weights_into(net(), tmp_path / "evil.pt")


def test_weights_with_another_head_keep_the_backbone(tmp_path):
    from safetensors.torch import save_file
    import timm
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    save_file(backbone.state_dict(), tmp_path / "b.safetensors")
    model = weights_into(net(), tmp_path / "b.safetensors")
    assert torch.equal(model.backbone.conv_stem.weight, backbone.conv_stem.weight)
    assert model.head.out_features == 1
    with pytest.raises(melanoma.DataError, match="does not fit"):
        weights_into(net("test_resnet"), tmp_path / "b.safetensors", "test_resnet")


def test_pretrained_download_failure_names_the_offline_flags(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(melanoma.DataError, match="--weights.*--no-pretrained"):
        melanoma.Net.timm_backbone("test_efficientnet", pretrained=True)


# ----------------------------------------------------------------------------------------------
# End to end: train, predict, outputs; several folds; two processes; resume

def check_outputs(data, out, name, fold):
    train = pd.read_csv(data / "train.csv").merge(pd.read_csv(data / "folds.csv")[["image_name", "fold"]])
    val = train[train["fold"] == fold]
    oof = pd.read_csv(out / f"{name}_fold{fold}_oof.csv")
    assert list(oof.columns) == ["image_name", "target", "pred", "fold"]
    assert sorted(oof["image_name"]) == sorted(val["image_name"])  # every validation image exactly once
    assert (oof.set_index("image_name")["target"] == val.set_index("image_name")["target"]).all()
    assert (oof["fold"] == fold).all() and oof["pred"].between(0, 1).all() and oof["pred"].nunique() > 1
    test = pd.read_csv(out / f"{name}_fold{fold}_test.csv")
    assert list(test.columns) == ["image_name", "target"]
    assert test["image_name"].tolist() == pd.read_csv(data / "test.csv")["image_name"].tolist()
    assert test["target"].between(0, 1).all()
    info = json.loads((out / f"{name}_fold{fold}.json").read_text())
    assert info["fold"] == fold and len(info["epochs"]) == info["args"]["epochs"]
    assert {"loss", "val_auc", "lr", "images_per_s"} <= set(info["epochs"][0])
    assert 0 <= info["oof_auc"] <= 1 and 0 <= info["oof_auc_no_tta"] <= 1 and info["wall_s"] > 0
    from sklearn.metrics import roc_auc_score
    assert info["oof_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["pred"]))
    from safetensors.torch import load_file
    assert "head.weight" in load_file(out / f"{name}_fold{fold}.safetensors")
    assert not list(out.glob("*.tmp")) and not list(out.glob("*_last.pt"))
    return oof, test, info


def test_end_to_end_two_folds(tiny_data, tmp_path):
    out = tmp_path / "preds"
    flags = ["--cutout", "--cache", tmp_path / "c", "--frac", "0.6"]
    r = run_cli("melanoma.py", *train_args(tiny_data, out, "--fold", "0", "1", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    folds = pd.read_csv(tiny_data / "folds.csv")
    for fold in (0, 1):
        info = check_outputs(tiny_data, out, "test_efficientnet_32", fold)[2]
        assert info["n_train"] == round(0.6 * (folds["fold"] != fold).sum())
        assert f"fold {fold} epoch  2/2  loss" in r.stdout
    assert "CV AUC over folds 0, 1" in r.stdout
    assert 30 < len(list((tmp_path / "c").iterdir())) <= len(folds) + 30  # each image read is cached once
    again = run_cli("melanoma.py", *train_args(tiny_data, out, "--fold", "0", *flags))  # same settings
    assert again.returncode == 0 and "finished already" in again.stdout and "epoch" not in again.stdout


def test_two_processes_score_every_image_once(tiny_data, tmp_path):
    out = tmp_path / "preds"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "melanoma.py",
                        *map(str, train_args(tiny_data, out, "--name", "ddp"))], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("fold 0 epoch  1/2") == 1  # only rank 0 prints
    oof, test, info = check_outputs(tiny_data, out, "ddp", 0)
    assert info["processes"] == 2 and len(oof) % 64 not in (0, 32)  # the last batch is padded, then unpadded
    targets = pd.read_csv(tiny_data / "folds.csv").query("fold != 0")["target"].to_numpy()
    sample = len(melanoma.EpochSampler.indices(targets, melanoma.EpochSampler.per_pool(targets, 2), 0, 0))
    assert [e["images"] for e in info["epochs"]] == [sample, sample]  # the ranks' shares add up to the sample
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["runs.csv"] + [f"ddp_fold0{s}" for s in ("_oof.csv", "_test.csv", ".json", ".safetensors", "_curves.png",
                                                  "_roc.png")])
    assert len(pd.read_csv(out / "runs.csv")) == 1  # one row, from the main process


def test_resume_after_a_kill_gives_the_same_predictions(tiny_data, tmp_path):
    args = train_args(tiny_data, None, "--epochs", "3")
    args[args.index("--out") + 1] = tmp_path / "a"
    assert run_cli("melanoma.py", *args).returncode == 0
    args[args.index("--out") + 1] = tmp_path / "b"
    ckpt = tmp_path / "b" / "test_efficientnet_32_fold0_last.pt"
    proc = subprocess.Popen([sys.executable, "melanoma.py", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 1  # killed during epoch 2
    assert not list((tmp_path / "b").glob("*.csv"))
    fresh = run_cli("melanoma.py", *args)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr
    r = run_cli("melanoma.py", *args, "--resume")
    assert r.returncode == 0 and "resuming after epoch 1" in r.stdout, r.stderr[-3000:]
    for kind in ("oof", "test"):
        a = pd.read_csv(tmp_path / "a" / f"test_efficientnet_32_fold0_{kind}.csv")
        b = pd.read_csv(tmp_path / "b" / f"test_efficientnet_32_fold0_{kind}.csv")
        assert a["image_name"].equals(b["image_name"])
        assert np.allclose(a.iloc[:, 1:].to_numpy(float), b.iloc[:, 1:].to_numpy(float), atol=1e-6)
    ja, jb = (json.loads((tmp_path / d / "test_efficientnet_32_fold0.json").read_text()) for d in "ab")
    assert [e["loss"] for e in ja["epochs"]] == pytest.approx([e["loss"] for e in jb["epochs"]], abs=1e-6)


def test_resume_refuses_other_settings(tiny_data, tmp_path):
    proc = subprocess.Popen([sys.executable, "melanoma.py", *map(str, train_args(tiny_data, tmp_path, "--epochs", "5"))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "test_efficientnet_32_fold0_last.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    r = run_cli("melanoma.py", *train_args(tiny_data, tmp_path, "--epochs", "5", "--lr-max", "1e-3"), "--resume")
    assert r.returncode == 2 and "other settings" in r.stderr


def test_non_finite_loss_stops_with_epoch_and_step(tiny_data, tmp_path):
    from safetensors.torch import save_file
    model = net()
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in model.state_dict().items()}, tmp_path / "nan.safetensors")
    r = run_cli("melanoma.py", *train_args(tiny_data, tmp_path / "out", "--weights", tmp_path / "nan.safetensors"))
    assert r.returncode == 2 and "loss is nan at epoch 1, step 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_non_finite_loss_later_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "test_efficientnet_32_fold0_last.pt"
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits",
                        lambda *a, **k: bce(*a, **k) * (float("nan") if ckpt.exists() else 1))
    with pytest.raises(SystemExit) as e:
        melanoma.main([str(a) for a in train_args(tiny_data, tmp_path)])
    assert e.value.code == 2 and "loss is nan at epoch 2, step 1" in capsys.readouterr().err
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


# ----------------------------------------------------------------------------------------------
# Bad data: one clear line, exit 2, nothing written

def first_image(data, split="train"):
    return next(iter(sorted((data / "jpeg" / split).iterdir())))


def break_csv(data, name, change):
    df = pd.read_csv(data / name)
    change(df).to_csv(data / name, index=False)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: first_image(d).unlink(), "No such file"),
    (lambda d: first_image(d).write_bytes(first_image(d).read_bytes()[:300]), "truncated"),
    (lambda d: smooth_image(64, 48).save(first_image(d), "PNG"), "no JPEG header"),
    (lambda d: first_image(d).write_bytes(b""), "empty file"),
    (lambda d: first_image(d, "test").unlink(), "jpeg/test/"),
    (lambda d: break_csv(d, "train.csv", lambda df: df.drop(columns="target")), "missing column(s) target"),
    (lambda d: break_csv(d, "train.csv", lambda df: df.assign(target=[0, 1, 0, "yes"] + [0] * (len(df) - 4))),
     "train.csv: row 5: target must be 0 or 1, got 'yes'"),
    (lambda d: break_csv(d, "folds.csv", lambda df: df.iloc[5:]), "5 image(s)"),
    (lambda d: shutil.rmtree(d / "jpeg"), "no competition data found"),
])
def test_bad_data_is_a_clear_error(data, tmp_path, capsys, breakage, message):
    breakage(data)
    with pytest.raises(SystemExit) as e:
        melanoma.main([str(a) for a in train_args(data, tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_undecodable_image_in_a_loader_process_is_a_clear_error(data, tmp_path):
    img = first_image(data)
    img.write_bytes(img.read_bytes()[:200] + b"\x00" * 50 + b"\xff\xd9")
    r = run_cli("melanoma.py", *train_args(data, tmp_path / "out", "--num-workers", "1"))
    assert r.returncode == 2 and img.name in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.csv"))


@pytest.mark.parametrize("flags, message", [
    (["--fold", "7"], "--fold 7"),
    (["--model", "no_such_net"], "--model no_such_net"),
    (["--size", "0"], "--size: must be positive"),
    (["--frac", "0"], "--frac"),
])
def test_bad_flags_are_clear_errors(tiny_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        melanoma.main([str(a) for a in train_args(tiny_data, tmp_path / "out")] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_get_args_defaults_are_the_recipe():
    a = melanoma.get_args(["--data-dir", "x"])
    assert (a.model, a.size, a.epochs, a.lr_min, a.lr_max, a.wd, a.tta, a.pretrained) == \
        ("tf_efficientnet_b5.ns_jft_in1k", 512, 20, 5e-6, 2e-4, 0.1, 15, True)
    d = melanoma.get_args(["--demo", "--size", "48"])
    assert d.model == "test_efficientnet" and not d.pretrained and d.size == 48


# ----------------------------------------------------------------------------------------------
# Hardening: every bad input refused before training, in one line, with exit code 2

def refused_run(argv, capsys, *names):
    """Run melanoma.main in-process; assert exit 2 and one stderr line naming each of `names`."""
    with pytest.raises(SystemExit) as e:
        melanoma.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(str(n) in err for n in names), err
    return err


def with_sof_size(jpeg, width, height):
    """JPEG bytes whose frame header claims width x height (the pixel data stays as it was)."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9:]


def no_melanoma_in_fold(d, fold):
    folds = pd.read_csv(d / "folds.csv")
    folds.loc[(folds["fold"] == fold) & (folds["target"] == 1), "fold"] = (fold + 1) % 5
    folds.to_csv(d / "folds.csv", index=False)


@pytest.mark.parametrize("breakage, flags, names", [
    # silent wrong results before: now refused
    (lambda d: break_csv(d, "test.csv", lambda df: pd.concat([df, df.iloc[:1]])), [],
     ["test.csv", "row 32", "duplicate image_name ISIC_9000000"]),
    (lambda d: break_csv(d, "test.csv", lambda df: df.iloc[:0]), [], ["test.csv", "no rows"]),
    (lambda d: break_csv(d, "train.csv", lambda df: df.iloc[:0]), [], ["train.csv", "no rows"]),
    (lambda d: break_csv(d, "train.csv", lambda df: df.assign(image_name=[""] + list(df["image_name"][1:]))),
     [], ["train.csv", "row 2", "image_name is empty"]),
    (lambda d: break_csv(d, "test.csv", lambda df: df.assign(image_name=[" ISIC_9000000"] + list(df["image_name"][1:]))),
     [], ["test.csv", "row 2", "surrounding spaces"]),
    (lambda d: no_melanoma_in_fold(d, 0), ["--fold", "1", "0"],
     ["--fold 0", "validation images hold only one class"]),
    (lambda d: break_csv(d, "folds.csv", lambda df: df.assign(fold=df["fold"].astype(float).where(df.index > 3, 0.5))),
     [], ["folds.csv", "row 2", "fold must be a whole number"]),
    # found late before (after training): now before the first epoch
    (lambda d: first_image(d, "test").write_bytes(with_sof_size(first_image(d, "test").read_bytes(), 60000, 60000)),
     [], ["jpeg/test/ISIC_9000000.jpg", "decompression bomb"]),
    (lambda d: first_image(d, "test").write_bytes(first_image(d, "test").read_bytes()[:-200]), [],
     ["jpeg/test/ISIC_9000000.jpg", "truncated"]),
    (lambda d: (d / "outfile").write_text("x"), ["--out", "{d}/outfile"], ["--out", "outfile", "a file, not a folder"]),
    (lambda d: (d / "outfile").write_text("x"), ["--out", "{d}/outfile/sub"], ["--out", "is a file, not a folder"]),
    (lambda d: (d / "cachefile").write_text("x"), ["--cache", "{d}/cachefile"], ["--cache", "a file, not a folder"]),
    # tracebacks before
    (lambda d: None, ["--folds", "{d}/jpeg"], ["folds file", "a folder, not a CSV file"]),
    (lambda d: (d / "w.safetensors").write_bytes(b"\x80\x04K\x01."), ["--weights", "{d}/w.safetensors"],
     ["--weights", "w.safetensors", "not a weights file"]),
    (lambda d: torch.save(torch.zeros(3), d / "w.pt"), ["--weights", "{d}/w.pt"], ["--weights", "holds no state dict"]),
    (lambda d: None, ["--weights", "{d}/jpeg"], ["--weights", "a folder, not a file"]),
    (lambda d: (lambda p: (p.unlink(), p.mkdir()))(first_image(d)), [], ["a folder, not an image"]),
    (lambda d: ((d / "test.csv").unlink(), (d / "test.csv").mkdir()), [], ["test.csv", "a folder, not a CSV file"]),
])
def test_bad_input_is_refused_before_training(data, tmp_path, capsys, breakage, flags, names):
    breakage(data)
    argv = train_args(data, tmp_path / "out") + [f.format(d=data) for f in flags]
    refused_run(argv, capsys, *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--neg-ratio", "nan"], "--neg-ratio: must be a finite number"),
    (["--neg-ratio", "-1"], "--neg-ratio: must be positive"),
    (["--lr-min", "0"], "--lr-min: must be at least 1e-12"),
    (["--lr-max", "-1"], "--lr-max: must be at least 1e-12"),
    (["--lr-min", "1e-2", "--lr-max", "1e-3"], "need --lr-min <= --lr-max"),
    (["--lr-max", "inf"], "--lr-max: must be a finite number"),
    (["--wd", "nan"], "--wd: must be a finite number"),
    (["--wd", "-0.1"], "--wd: must be 0 or more"),
    (["--frac", "nan"], "--frac"),
    (["--size", "100000"], "--size: must be at most 4096"),
    (["--size", "x"], "--size: invalid int value"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--tta", "-2"], "--tta: must be 0 or more"),
    (["--num-workers", "1000"], "--num-workers: must be at most 64"),
    (["--fold", "1", "1"], "--fold lists a fold twice"),
    (["--name", "a/b"], "--name: must be a plain file-name part"),
    (["--name", ""], "--name: empty; give a value"),
    (["--name", "caf\udce9"], "--name: not valid UTF-8 text"),  # trained, then failed writing its plots
    (["--out", "o\udce9"], "--out: not valid UTF-8 text"),  # trained, then the ledger crashed
    (["--resume", "--overwrite"], "pass one"),
    (["--lr-min", "1e-320", "--lr-max", "1e308"], "--lr-min: must be at least 1e-12"),
    (["--batch-size", "99999999999"], "--batch-size: must be at most 65536"),
    (["--name", "n" * 240], "--name: must be a plain file-name part of at most 150 characters"),
    (["--explain", "100000"], "--explain: must be at most 32"),
    (["--skip-bad"], "--skip-bad goes with --predict"),
])
def test_bad_flags_are_one_line(tiny_data, tmp_path, capsys, flags, message):
    refused_run(train_args(tiny_data, tmp_path / "out") + flags, capsys, message)
    assert not (tmp_path / "out").exists()


def test_outputs_that_would_be_lost_or_misread_are_refused(tiny_data, data, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.csv").write_text("mine")
    refused_run(["--demo", "--data-dir", user, "--out", tmp_path / "out"], capsys, "not an empty folder")
    assert [p.name for p in user.iterdir()] == ["notes.csv"]
    (tmp_path / "out" / "test_efficientnet_32_fold0_oof.csv").mkdir(parents=True)
    refused_run(train_args(tiny_data, tmp_path / "out"), capsys, "fold0_oof.csv", "a folder where an output file goes")
    (tmp_path / "folds.csv").write_text("keep me")
    refused_run(["--make-folds", tiny_data / "train.csv", "--out", tmp_path / "folds.csv"], capsys, "exists",
                "--overwrite")
    assert (tmp_path / "folds.csv").read_text() == "keep me"


def test_a_finished_fold_is_reused_only_with_the_same_settings(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    args = [str(a) for a in train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "tiny")]
    melanoma.main(args)
    assert "fold 0: finished already with these settings" in capsys.readouterr().out
    refused_run(args + ["--size", "48"], capsys, "tiny_fold0.json", "saved with other settings",
                "--size 32 (saved) vs 48 (now)", "--overwrite")
    (out / "tiny_fold0.json").write_text("{trunc")
    refused_run(args, capsys, "tiny_fold0.json", "cannot be read", "--overwrite")


def test_fp16_on_the_cpu_is_refused_not_ignored(tiny_data, tmp_path):
    r = run_cli("melanoma.py", *train_args(tiny_data, tmp_path / "out", "--mixed-precision", "fp16", "--cpu"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --mixed-precision fp16 needs a GPU; on the CPU use bf16 or no"
    assert not (tmp_path / "out").exists()


def test_names_that_pandas_would_call_missing_stay_names(tmp_path):
    (tmp_path / "t.csv").write_text("image_name,target\nNA,0\nnan,1\n")
    assert melanoma.read_csv(tmp_path / "t.csv", ["image_name"], "train file")["image_name"].tolist() == ["NA", "nan"]


def test_huge_neg_ratio_takes_every_benign_image():
    targets = np.array([1] * 10 + [0] * 100)
    assert melanoma.EpochSampler.per_pool(targets, 20, neg_ratio=1e308) == 100


def test_unwritable_output_folder_is_refused_run(tiny_data, tmp_path, capsys, monkeypatch):
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(melanoma.tempfile, "TemporaryFile", read_only)
    refused_run(train_args(tiny_data, tmp_path / "out"), capsys, "--out", "cannot write in", "Permission denied")
    assert not (tmp_path / "out").exists()


def fake_checkpoint(data, out, saved, fold=0):
    """A checkpoint as melanoma.py writes it, with the run key of the settings `saved`."""
    args = melanoma.get_args([str(a) for a in train_args(data, out, "--fold", fold)] + saved)
    key = melanoma.run_key(args, SimpleNamespace(mixed_precision=args.mixed_precision or "no", num_processes=1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"test_efficientnet_32_fold{fold}_last.pt"
    torch.save(dict(model={}, optimizer={}, scheduler={}, history=[], run=key), path)
    return path


@pytest.mark.parametrize("saved, now, names", [
    (["--mixed-precision", "bf16"], [], ["--mixed-precision 'bf16' (saved) vs 'no' (now)"]),
    (["--lr-max", "1e-3"], [], ["--lr-max 0.001 (saved) vs 0.003 (now)"]),
    (["--size", "48", "--cutout"], [], ["--size 48 (saved) vs 32 (now)", "--cutout True (saved) vs False (now)"]),
    (["--target", "diagnosis"], [], ["--target 'diagnosis' (saved) vs 'melanoma' (now)"]),
])
def test_resume_names_each_setting_that_differs(tiny_data, tmp_path, capsys, saved, now, names):
    ckpt = fake_checkpoint(tiny_data, tmp_path, saved)
    err = refused_run(train_args(tiny_data, tmp_path, "--resume") + now, capsys, ckpt.name, *names)
    assert "--seed" not in err and [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_resume_key_compares_normalised_paths(tiny_data, tmp_path):
    acc = SimpleNamespace(mixed_precision="no", num_processes=1)
    a = melanoma.get_args(["--data-dir", f"{tiny_data}/", "--folds", f"{tiny_data}/./folds.csv"])
    b = melanoma.get_args(["--data-dir", str(tiny_data), "--folds", str(tiny_data / "folds.csv")])
    assert melanoma.run_key(a, acc) == melanoma.run_key(b, acc)
    assert melanoma.run_key(a, acc) != melanoma.run_key(b, SimpleNamespace(mixed_precision="bf16", num_processes=1))


@pytest.mark.parametrize("content, message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "a checkpoint that cannot be read"),
    (lambda p: torch.save({"model": Evil()}, p), "a checkpoint that cannot be read"),
    (lambda p: torch.save({"model": {}}, p), "not melanoma.py's"),
])
def test_resume_refuses_damaged_or_hostile_checkpoints(tiny_data, tmp_path, capsys, content, message):
    path = tmp_path / "test_efficientnet_32_fold0_last.pt"
    content(path)
    refused_run(train_args(tiny_data, tmp_path, "--resume"), capsys, path.name, message)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoint_of_a_later_fold_is_refused_before_the_first_fold_trains(tiny_data, tmp_path, capsys):
    ckpt = fake_checkpoint(tiny_data, tmp_path, [], fold=1)
    refused_run(train_args(tiny_data, tmp_path, "--fold", "0", "1"), capsys, ckpt.name, "--resume", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_a_finished_fold_trained_with_another_tta_is_not_reused(tiny_data, tmp_path, capsys):
    args = train_args(tiny_data, tmp_path / "out", "--epochs", "1", "--name", "t")
    melanoma.main([str(a) for a in args + ["--tta", "1"]])
    refused_run(args + ["--tta", "3"], capsys, "t_fold0.json", "saved with other settings",
                "--tta 1 (saved) vs 3 (now)")


def test_an_edited_augs_file_is_another_setting_and_predict_uses_the_trained_stack(tiny_data, tmp_path, capsys):
    augs = tmp_path / "augs.yaml"
    augs.write_text(melanoma.DEFAULT_AUGS)
    out = tmp_path / "out"
    args = train_args(tiny_data, out, "--epochs", "1", "--tta", "2", "--name", "a", "--augs", augs)
    melanoma.main([str(a) for a in args])
    augs.write_text(melanoma.DEFAULT_AUGS.replace("degrees: 180", "degrees: 5"))
    refused_run(args, capsys, "a_fold0.json", "saved with other settings", "--augs")
    melanoma.main(["--predict", str(tiny_data / "test.csv"), "--name", "a", "--out", str(out), "--tta", "2",
                   "--num-workers", "0"])
    ours = pd.read_csv(out / "a_predict.csv")["fold0"].to_numpy()
    assert np.array_equal(ours, pd.read_csv(out / "a_fold0_test.csv")["target"].to_numpy())  # the trained stack


@pytest.mark.parametrize("tool", [["--lr-find"], ["--benchmark"], ["--runs", "o"], ["--make-folds", "t.csv"]])
def test_explain_with_another_tool_is_refused(tiny_data, tmp_path, capsys, tool):
    refused_run(train_args(tiny_data, tmp_path / "out", "--explain", "2", *tool), capsys, "--explain",
                "are two tools: pass one")
    assert not (tmp_path / "out").exists()


def test_jpeg_completeness_looks_past_trailing_bytes_and_through_progressive_scans(tmp_path):
    smooth_image(300, 200).save(tmp_path / "a.jpg", quality=90)
    smooth_image(300, 200).save(tmp_path / "p.jpg", quality=90, progressive=True)
    for name in ("a.jpg", "p.jpg"):
        data = (tmp_path / name).read_bytes()
        for ok, cut in ((True, data), (True, data + bytes(5000)),  # trailing bytes after the end marker
                        (False, data[:len(data) // 2]), (False, data[:-2] + bytes(5000)),
                        (False, data[:-2])):
            (tmp_path / "t.jpg").write_bytes(cut)
            if ok:
                melanoma.check_images([str(tmp_path / "t.jpg")])
            else:
                with pytest.raises(melanoma.DataError, match="truncated"):
                    melanoma.check_images([str(tmp_path / "t.jpg")])
    # a camera's multi-picture JPEG (Pillow's format MPO) is a JPEG: it was refused as "not a JPEG"
    smooth_image(300, 200).save(tmp_path / "m.jpg", "MPO", save_all=True, append_images=[smooth_image(300, 200)])
    melanoma.check_images([str(tmp_path / "m.jpg")])


def test_numeric_names_trailing_bytes_and_resume_without_checkpoint_train(data, tmp_path):
    """Image names that look like numbers, a valid JPEG with trailing bytes, --resume with no
    checkpoint: all train; the log file gets no progress bars; the JSON is strict JSON."""
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
    r = run_cli("melanoma.py", *train_args(data, out, "--epochs", "1", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume found no checkpoint" in r.stdout and "starting from scratch" in r.stdout
    assert "\r" not in r.stderr and "it/s" not in r.stderr
    text = (out / "test_efficientnet_32_fold0.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    test = pd.read_csv(out / "test_efficientnet_32_fold0_test.csv", dtype={"image_name": str})
    assert test["image_name"].iloc[0] == "50000" and len(test) == 30


def test_make_folds_tfrecords_beyond_14_and_bad_rows(tmp_path, capsys):
    df = pd.DataFrame(dict(image_name=[f"i{t}" for t in range(-1, 20)], patient_id=[f"p{t}" for t in range(-1, 20)],
                           target=0, tfrecord=range(-1, 20)))
    folds = melanoma.make_folds(df, 5)
    assert folds["fold"].tolist()[:16] == [-1, 2, 1, 0, 3, 0, 0, 4, 4, 3, 2, 1, 3, 2, 1, 4]  # published
    assert folds["fold"].tolist()[16:] == [t % 5 for t in range(15, 20)]
    df.to_csv(tmp_path / "t.csv", index=False)
    melanoma.main(["--make-folds", str(tmp_path / "t.csv"), "--out", str(tmp_path / "f.csv")])
    assert "21 images, 21 patients, 1 left out (fold -1)" in capsys.readouterr().out
    for change, names in ((lambda d: d.assign(patient_id=[""] + list(d["patient_id"][1:])), ["row 2", "patient_id is empty"]),
                          (lambda d: d.assign(tfrecord=[np.nan] + list(d["tfrecord"][1:])), ["row 2", "tfrecord"])):
        change(df).to_csv(tmp_path / "t.csv", index=False)
        refused_run(["--make-folds", tmp_path / "t.csv", "--out", tmp_path / "g.csv"], capsys, "t.csv", *names)
        assert not (tmp_path / "g.csv").exists()
    refused_run(["--make-folds", tmp_path / "t.csv", "--out", tmp_path], capsys, "--out", "a folder, not a file")


# ----------------------------------------------------------------------------------------------
# Modelling: metadata, heads, external data

def meta_table(**cols):
    df = pd.DataFrame(cols)
    df["path"] = ""
    df["patient_images"] = df.groupby("patient_id")["image_name"].transform("size")
    return df


def test_meta_features_scale_mark_missing_and_share_categories():
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
    assert a.shape == (4, melanoma.ExtrasNet.shape(melanoma.get_args([]), spec, None)["n_meta"]) == (4, 12) and b.shape == (1, 12) and a.dtype == np.float32
    # columns: female, male, sex missing, head/neck, palms/soles, torso, site missing, age, age missing,
    # patient images, size, size missing
    assert a[:, :3].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert a[:, 3:7].tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert b[0, 3:7].tolist() == [0, 1, 0, 0]
    assert a[:, 7].tolist() == pytest.approx([-1, 0, 0, 1]) and a[:, 8].tolist() == [0, 0, 1, 0]
    assert a[0, 9] > a[3, 9] and a[0, 10] < a[2, 10]  # 3 images vs 1; 600x400 vs 6000x4000
    with_size_missing = train.assign(width=[600, np.nan, 6000, 6000])
    assert melanoma.meta_features(with_size_missing, spec)[1, 10:].tolist() == [0, 1]


def test_heads_and_multi_sample_dropout():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    meta = torch.randn(6, 5)
    for head in ("linear", "mlp"):
        model = net(n_meta=5, head=head, dropout=0.5, msd=4)
        model.eval()
        out = model(x, meta)
        assert out.shape == (6, 1) and torch.equal(out, model(x, meta))  # eval: deterministic
        model.msd = 1
        assert torch.allclose(out, model(x, meta))  # in eval, msd changes nothing
        model.train()
        model.msd = 4
        with melanoma.seeded(1):
            many = model(x, meta)
        model.msd = 1
        with melanoma.seeded(1):
            features = torch.cat([model.backbone(x), model.meta(meta)], 1)
            masks = [model.head(model.dropout(features)) for _ in range(4)]
        assert torch.allclose(many, torch.stack(masks).mean(0), atol=1e-6)  # the mean over 4 masks
    plain = net()
    assert isinstance(plain.head, torch.nn.Linear) and plain.meta is None  # the recipe: one Linear


def test_meta_mlp_external_end_to_end_never_validates_external_images(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--meta", "--head", "mlp", "--dropout", "0.2",
                                              "--msd", "2", "--external", tiny_data / "isic2019",
                                              "--external-neg-ratio", "1", "--epochs", "1")])
    log = capsys.readouterr().out
    assert "147 images" in log and "3 dropped, already among the training images" in log
    external = pd.read_csv(tiny_data / "isic2019" / "train.csv")
    oof = pd.read_csv(out / "test_efficientnet_32_fold0_oof.csv")
    folds = pd.read_csv(tiny_data / "folds.csv")
    assert sorted(oof["image_name"]) == sorted(folds.query("fold == 0")["image_name"])
    assert not set(oof["image_name"]) & (set(external["image_name"]) - set(folds["image_name"]))
    assert len(pd.read_csv(out / "test_efficientnet_32_fold0_test.csv")) == 30
    info = json.loads((out / "test_efficientnet_32_fold0.json").read_text())
    assert info["n_external"] == 147 and info["meta"]["size"] == "bytes"
    assert info["n_train"] == (folds["fold"] != 0).sum() + 147


def test_external_images_only_train_and_get_their_own_ratio(tiny_data, tmp_path):
    args = melanoma.get_args(["--data-dir", str(tiny_data), "--folds", str(tiny_data / "folds.csv"), "--out", tmp_path,
                              "--external", str(tiny_data / "isic2019"), "--external-neg-ratio", "2", "--epochs", "4"])
    acc = SimpleNamespace(process_index=0, num_processes=1, print=lambda *a: None, mixed_precision="no")
    hooks = melanoma.Extras(args, acc)
    train, _ = hooks.rows(*melanoma.read_data(args, hooks, acc.print))
    assert (train.loc[train["external"], "fold"] == -1).all() and train["image_name"].is_unique
    for fold in range(5):
        trn, val = melanoma.split_fold(train, fold, 1.0, 0)
        assert not val["external"].any() and trn["external"].sum() == 147
    trn, _ = melanoma.split_fold(train, 0, 1.0, 0)
    sampler = hooks.sampler(trn)
    ext_pos = int((trn["external"] & (trn["target"] == 1)).sum())
    idx = [i for b in sampler for i in b]
    chosen = trn.iloc[idx]
    assert (chosen["target"] == 1).sum() == trn["target"].sum()  # every melanoma
    assert ((chosen["target"] == 0) & chosen["external"]).sum() == 2 * ext_pos
    comp_neg = int(((trn["target"] == 0) & ~trn["external"]).sum())
    assert ((chosen["target"] == 0) & ~chosen["external"]).sum() == -(-comp_neg // 4)


@pytest.mark.parametrize("breakage, flags, names", [
    (lambda d: break_csv(d, "test.csv", lambda df: df.drop(columns=["sex", "age_approx"])), ["--meta"],
     ["test.csv", "--meta needs column(s) sex, age_approx"]),
    (lambda d: break_csv(d, "isic2019/train.csv", lambda df: df.assign(diagnosis=["XYZ"] + list(df["diagnosis"][1:]))),
     ["--external", "{d}/isic2019"], ["isic2019/train.csv", "row 2", "'XYZ'", "MEL"]),
    (lambda d: None, ["--external", "{d}/nowhere"], ["--external", "nowhere", "no train.csv"]),
    (lambda d: (d / "isic2019" / "train" / "ISIC_1000010.jpg").unlink(), ["--external", "{d}/isic2019"],
     ["ISIC_1000010.jpg", "No such file"]),
    (lambda d: None, ["--msd", "4"], ["--msd averages over dropout masks"]),
    (lambda d: None, ["--dropout", "1"], ["--dropout: must be below 1"]),
    (lambda d: None, ["--external-neg-ratio", "2"], ["--external-neg-ratio needs --external"]),
    (lambda d: None, ["--head", "big"], ["--head", "invalid choice"]),
])
def test_modelling_bad_input_is_one_line(data, tmp_path, capsys, breakage, flags, names):
    breakage(data)
    refused_run(train_args(data, tmp_path / "out") + [f.format(d=data) for f in flags], capsys, *names)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Using a trained model: --predict and --explain

@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """A finished fold 0 of run 'tiny' (plain passes, --tta 0), and its output folder."""
    out = tmp_path_factory.mktemp("run")
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "tiny")])
    return out


def test_predict_the_test_set_gives_the_runs_own_numbers(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    melanoma.main(["--predict", str(tiny_data / "test.csv"), "--name", "tiny", "--out", str(out),
                   "--tta", "0", "--num-workers", "0"])
    assert "30 images, 1 fold(s) averaged" in capsys.readouterr().out
    ours = pd.read_csv(out / "tiny_predict.csv")
    theirs = pd.read_csv(out / "tiny_fold0_test.csv")
    assert list(ours.columns) == ["image_name", "fold0", "target"]
    assert ours["image_name"].equals(theirs["image_name"])
    assert np.array_equal(ours["fold0"].to_numpy(), theirs["target"].to_numpy())  # exactly
    assert np.array_equal(ours["target"].to_numpy(), theirs["target"].to_numpy())


def test_predict_a_folder_with_tta_and_explain(tiny_data, trained_run, tmp_path, capsys):
    folder = tmp_path / "clinic"
    (folder / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "jpeg" / "test").iterdir())[:3]):
        shutil.copy(src, folder / "a" / f"img{i}.jpg")
    Image.open(first_image(tiny_data, "test")).save(folder / "photo.PNG")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    melanoma.main(["--predict", str(folder), "--name", "tiny", "--out", str(out), "--tta", "2",
                   "--num-workers", "0", "--explain", "1"])
    pred = pd.read_csv(out / "tiny_predict.csv")
    assert pred["image_name"].tolist() == ["a/img0.jpg", "a/img1.jpg", "a/img2.jpg", "photo.PNG"]
    assert pred["target"].between(0, 1).all()
    with Image.open(out / "tiny_fold0_explain.png") as im:
        assert im.format == "PNG" and im.size[1] > im.size[0]  # one row per case: 1 FP, 1 FN, 1 new
    assert "Grad-CAM of 3 images" in capsys.readouterr().out


def test_predict_a_csv_with_a_fold_column_and_explain(tiny_data, trained_run, tmp_path):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    test = pd.read_csv(tiny_data / "test.csv").head(3)[["image_name"]].assign(fold0=0.5)
    test.to_csv(tmp_path / "new.csv", index=False)  # a column named as the fold's scores
    melanoma.main(["--predict", str(tmp_path / "new.csv"), "--data-dir", str(tiny_data), "--name", "tiny",
                   "--out", str(out), "--tta", "0", "--num-workers", "0", "--explain", "1"])
    assert (out / "tiny_fold0_explain.png").is_file()
    assert pd.read_csv(out / "tiny_predict.csv")["fold0"].ne(0.5).all()


class DarkSpot(torch.nn.Module):
    """A stand-in backbone whose one feature map is each pixel's darkness: its logit is the mean
    darkness, so Grad-CAM must light up where the dark lesion is."""
    num_features = 1
    pretrained_cfg = dict(mean=(0, 0, 0), std=(1, 1, 1))

    def forward_features(self, x):
        return torch.nn.functional.avg_pool2d(1 - x.mean(1, keepdim=True), 4)

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_grad_cam_peaks_on_the_lesion():
    model = melanoma.ExtrasNet(DarkSpot())
    torch.nn.init.ones_(model.head.weight)
    image = torch.full((1, 3, 64, 64), 230, dtype=torch.uint8)
    image[:, :, 40:56, 8:24] = 20  # a dark lesion in the lower left
    probs, cam = melanoma.grad_cam(model, melanoma.Augment((0, 0, 0), (1, 1, 1)), image)
    assert cam.shape == (1, 64, 64) and float(cam.max()) == pytest.approx(1) and float(cam.min()) >= 0
    peak = divmod(int(cam[0].argmax()), 64)
    assert 40 <= peak[0] < 56 and 8 <= peak[1] < 24
    assert cam[0, 40:56, 8:24].mean() > 5 * cam[0, :16, 40:].mean()
    assert 0 < float(probs[0]) < 1


def test_predict_bad_input_is_one_line(tiny_data, trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--out", out, "--num-workers", "0", "--tta", "0"]
    refused_run(["--predict", empty, "--name", "nobody", *base], capsys, "--name nobody", "nobody_fold{k}.safetensors")
    refused_run(["--predict", empty, "--name", "tiny", *base], capsys, "--predict", "no images")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(first_image(tiny_data, "test"), bad / "good.jpg")
    (bad / "broken.jpg").write_bytes(first_image(tiny_data, "test").read_bytes()[:200])
    (bad / "empty.png").write_bytes(b"")
    refused_run(["--predict", bad, "--name", "tiny", *base], capsys, "2 image(s) cannot be used", "broken.jpg",
                "empty.png", "--skip-bad")
    assert not (out / "tiny_predict.csv").exists()
    melanoma.main([str(a) for a in ["--predict", bad, "--name", "tiny", *base, "--skip-bad"]])
    assert pd.read_csv(out / "tiny_predict.csv")["image_name"].tolist() == ["good.jpg"]
    skipped = pd.read_csv(out / "tiny_predict_skipped.tsv", sep="\t")
    assert sorted(skipped["image_name"]) == ["broken.jpg", "empty.png"]
    info = json.loads((out / "tiny_fold0.json").read_text())
    info["args"]["size"] = info["run"]["size"] = 64
    (out / "tiny_fold3.json").write_text(json.dumps(info))
    shutil.copy(out / "tiny_fold0.safetensors", out / "tiny_fold3.safetensors")
    refused_run(["--predict", bad, "--name", "tiny", *base], capsys, "tiny_fold3.safetensors", "different models",
                "size")
# Workbench: LR range test, augmentation configs, hair, plots, progressive resizing, the ledger

def is_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (im.format, im.size)
        im.verify()
    return True


def test_workbench_lr_find_writes_files_suggests_within_range_and_keeps_no_weights(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--lr-find", "--lr-find-steps", "40",
                                              "--name", "t")])
    said = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["t_lr_find.csv", "t_lr_find.png"]  # no weights, no ledger
    curve = pd.read_csv(out / "t_lr_find.csv")
    assert list(curve.columns) == ["step", "lr", "loss", "smoothed", "band_low", "band_high"]
    assert 10 <= len(curve) <= 40 and curve["lr"].iloc[0] == pytest.approx(1e-7)
    assert np.allclose(np.diff(np.log(curve["lr"])), np.log(1e7) / 39)  # 1e-7 to 1 in 40 steps
    if "suggested" in said:  # not on a flat curve
        lr_min, lr_max = (float(said.split(f"--{k} ")[1].split()[0].rstrip(",")) for k in ("lr-min", "lr-max"))
        assert curve["lr"].min() <= lr_max <= curve["lr"].max() and lr_min == pytest.approx(lr_max / 40, rel=0.05)
    assert is_png(out / "t_lr_find.png")


def test_workbench_lr_range_test_leaves_the_model_alone_stops_on_divergence_and_suggests(tiny_data):
    from accelerate import Accelerator
    args = melanoma.get_args(["--lr-find", *TINY, "--lr-find-end", "1e9", "--lr-find-steps", "60"])
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aug = melanoma.Augment(MEAN, STD)
    r = np.random.default_rng(0)
    batches = ((torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)) for _ in range(60))
    targets = torch.tensor(r.integers(0, 2, 8), dtype=torch.float32)
    curve = melanoma.lr_range_test(model, aug, batches, targets, Accelerator(cpu=True), args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    smoothed = curve["loss"].ewm(alpha=0.02).mean()  # the stopping rule's average, bias-corrected
    assert len(curve) < 60 and smoothed.iloc[-1] > 4 * smoothed.min()  # stopped: diverged
    # a U-shaped loss whose minimum is at 1e-2: --lr-max a tenth of it, --lr-min 40 times less
    lrs = np.logspace(-7, 0, 200)
    u = pd.DataFrame(dict(lr=lrs, smoothed=(np.log10(lrs) + 2) ** 2))
    assert melanoma.suggest_lrs(u) == pytest.approx((1e-3 / 40, 1e-3, 1e-2), rel=0.05)


def test_workbench_augs_config_round_trip_builds_the_recipe_stack(tmp_path):
    import kornia.augmentation as K
    import yaml
    (tmp_path / "augs.yaml").write_text(melanoma.DEFAULT_AUGS)
    args = melanoma.get_args(["--augs", str(tmp_path / "augs.yaml")])
    from_file = melanoma.Augment.build(melanoma.aug_entries(args), melanoma.OWN_AUGS)
    recipe = [K.RandomAffine(degrees=180, translate=(0.02, 0.02)), K.RandomHorizontalFlip(p=0.5),
              K.ColorJitter(brightness=0.1, contrast=(0.7, 1.3), saturation=(0.8, 1.2))]
    assert [repr(m) for m in from_file] == [repr(m) for m in recipe]
    assert [repr(m) for m in melanoma.Augment(MEAN, STD).random] == [repr(m) for m in recipe]
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    outs = []
    for stack in (from_file, recipe, None):
        with melanoma.seeded(3):
            outs.append(melanoma.Augment(MEAN, STD, stack=stack)(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    hair = melanoma.Augment.build(yaml.safe_load("- name: Hair\n  p: 0.3\n- name: RandomVerticalFlip\n"), melanoma.OWN_AUGS)
    assert isinstance(hair[0], melanoma.Hair) and hair[0].p == 0.3 and isinstance(hair[1], K.RandomVerticalFlip)
    with_hair = melanoma.Augment.build(melanoma.aug_entries(melanoma.get_args(["--hair", "0.2"])), melanoma.OWN_AUGS)
    assert [type(m).__name__ for m in with_hair] == ["RandomAffine", "RandomHorizontalFlip", "ColorJitter", "Hair"]
    import textwrap
    assert textwrap.indent(melanoma.DEFAULT_AUGS, "   ") in (ROOT / "README.md").read_text()  # the README shows it


def test_workbench_default_augs_file_reproduces_the_default_run(tiny_data, tmp_path):
    (tmp_path / "augs.yaml").write_text(melanoma.DEFAULT_AUGS)
    for name, extra in (("plain", []), ("file", ["--augs", tmp_path / "augs.yaml"])):
        melanoma.main([str(a) for a in train_args(tiny_data, tmp_path / "out", "--epochs", "1", "--tta", "1",
                                                  "--name", name, *extra)])
    for kind in ("oof", "test"):
        assert (tmp_path / "out" / f"plain_fold0_{kind}.csv").read_bytes() == \
            (tmp_path / "out" / f"file_fold0_{kind}.csv").read_bytes()
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["name"].tolist() == ["plain", "file"]
    assert f"--augs {tmp_path / 'augs.yaml'}" in runs["settings"][1] and "--augs" not in runs["settings"][0]


@pytest.mark.parametrize("text, names", [
    (None, ["--augs", "nothere.yaml", "no such file"]),
    ("- name: RandomAffine\n  degrees: [1, 2\n", ["--augs", "augs.yaml", "not YAML"]),
    ("name: RandomAffine\n", ["--augs", "augs.yaml", "not a list", "dict"]),
    ("- degrees: 180\n", ["entry 1", "needs a name"]),
    ("- name: RandomHorizontalFlip\n- name: RandomAfine\n  degrees: 3\n",
     ["augs.yaml", "entry 2 (RandomAfine)", "not a 2D augmentation", "did you mean RandomAffine"]),
    ("- name: ColorJitter\n  brightnes: 0.1\n", ["entry 1 (ColorJitter)", "bad arguments", "brightnes"]),
    ("- name: Hair\n  p: 2\n", ["entry 1 (Hair)", "p 2 is a probability: it must be in [0, 1]"]),
    ("- name: Resize\n  size: [16, 16]\n", ["entry 1 (Resize)", "must keep the shape"]),
])
def test_workbench_bad_augs_files_are_one_line_errors(tiny_data, tmp_path, capsys, text, names):
    path = tmp_path / ("nothere.yaml" if text is None else "augs.yaml")
    if text is not None:
        path.write_text(text)
    refused_run(train_args(tiny_data, tmp_path / "out", "--augs", path), capsys, *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--hair", "1.5"], "--hair: must be at most 1"),
    (["--weights", "w.safetensors", "--init-from", "run"], "pass one"),
    (["--lr-find", "--lr-find-start", "1", "--lr-find-end", "1e-3"], "need --lr-find-start < --lr-find-end"),
    (["--lr-find", "--lr-find-steps", "3"], "--lr-find-steps: must be at least 10"),
    (["--lr-find", "--runs"], "are two tools: pass one"),
])
def test_workbench_bad_flags_are_one_line(tiny_data, tmp_path, capsys, flags, message):
    refused_run(train_args(tiny_data, tmp_path / "out") + flags, capsys, message)


def test_workbench_hair_shape_range_identity_and_seeded():
    x = torch.rand(16, 3, 40, 56)
    assert melanoma.Hair(p=0)(x) is x
    with melanoma.seeded(1):
        a = melanoma.Hair(p=1)(x)
    with melanoma.seeded(1):
        b = melanoma.Hair(p=1)(x)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    white = torch.ones(64, 3, 64, 64)
    with melanoma.seeded(2):
        haired = melanoma.Hair(p=1)(white)
    changed = (haired < 1).any(1)  # (images, pixels): where a strand darkened the image
    assert changed.flatten(1).any(1).all()  # p=1: every image gets hair
    assert 0.005 < changed.float().mean() < 0.2 and haired.amin() < 0.3  # thin strands, dark at the core
    with melanoma.seeded(2):
        half = melanoma.Hair(p=0.5)(white)
    assert 16 < int((half < 1).flatten(1).any(1).sum()) < 48
    # the draws do not depend on p: what follows in the stream is the same
    follows = []
    for p in (0.1, 0.9):
        with melanoma.seeded(4):
            melanoma.Hair(p=p)(x)
            follows.append(torch.rand(3))
    assert torch.equal(*follows)


def test_workbench_plots_ledger_runs_and_init_from(tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score
    out = tmp_path / "out"
    base = [str(a) for a in train_args(tiny_data, out, "--fold", "0", "1", "--epochs", "1", "--tta", "1")]
    melanoma.main(base + ["--name", "small", "--hair", "0.5"])
    for fold in (0, 1):
        assert is_png(out / f"small_fold{fold}_curves.png") and is_png(out / f"small_fold{fold}_roc.png")
    info = json.loads((out / "small_fold0.json").read_text())
    assert info["augmentations"][-1].startswith("Hair(p=0.5")
    # progressive resizing: each fold starts from the same fold's weights; a near-zero rate keeps them
    melanoma.main(base + ["--name", "big", "--size", "48", "--init-from", "small", "--lr-min", "1e-12",
                          "--lr-max", "1e-12"])
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
    cv = roc_auc_score(oof["target"], oof["pred"])
    row = next(line for line in said.splitlines() if line.startswith("small "))
    assert row.split()[1] == "0,1" and row.split()[2] == f"{cv:.4f}"
    assert f"--size 512 --fold 0 1 --name small_512 --init-from small --out {out}" in said
    assert "--init-from small --size 512" not in said  # the earlier --init-from is replaced
    # a fold without weights to start from is refused before any fold trains
    (out / "small_fold1.safetensors").unlink()
    refused_run(base + ["--name", "again", "--init-from", "small"], capsys, "--init-from small",
                "small_fold1.safetensors", "fold 1")
    assert not list(out.glob("again*"))


def test_workbench_ledger_groups_names_ranks_by_concatenated_oof_and_takes_concurrent_appends(tmp_path, capsys):
    import multiprocessing
    from sklearn.metrics import roc_auc_score
    r = np.random.default_rng(0)
    oofs = {}
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
    assert table["auc"].is_monotonic_decreasing and table["name"].tolist() == sorted(
        ["a", "b"], key=lambda n: -table.set_index("name").loc[n, "auc"])
    # runs that finish at once each append one whole row, and the header stays single
    ledger = tmp_path / "many" / "runs.csv"
    ledger.parent.mkdir()
    row = dict(date="d", name="x, with a comma", fold=0, oof_auc=0.5, oof_auc_no_tta=0.5, wall_s=1.0,
               settings="--size 48", out="o")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.starmap(melanoma.append_run, [(ledger, {**row, "fold": i}) for i in range(200)])
    many = pd.read_csv(ledger)
    assert sorted(many["fold"]) == list(range(200)) and (many["name"] == "x, with a comma").all()
    assert ledger.read_text().count("date,name") == 1


@pytest.mark.parametrize("content, names", [
    (None, ["ledger", "runs.csv", "no such file"]),
    ("", ["ledger", "runs.csv", "cannot read it as CSV"]),
    (",".join(ensemble.LEDGER) + "\n", ["runs.csv", "no rows"]),
    ("date,name\nx,y\n", ["runs.csv", "missing column(s) fold"]),
    (",".join(ensemble.LEDGER) + "\nd,a,0,high,0.5,1,,o\n", ["runs.csv", "row 2", "oof_auc must be a finite number"]),
])
def test_workbench_bad_ledger_is_one_line(tmp_path, capsys, content, names):
    if content is not None:
        (tmp_path / "runs.csv").write_text(content)
    refused_run(["--runs", tmp_path], capsys, *names)


def test_workbench_ensemble_leaves_out_the_ledger(tmp_path):
    write_model(tmp_path, "m", {0: (Y, [0.1, 0.9, 0.2, 0.8, 0.3, 0.4])}, [0.5, 0.6])
    melanoma.append_run(tmp_path / "runs.csv", dict(date="d", name="m", fold=0, oof_auc=1.0, oof_auc_no_tta=1.0,
                                                    wall_s=1.0, settings="", out="o"))
    r = run_ensemble(tmp_path)  # every *.csv, as `python ensemble.py preds/*.csv` passes them
    assert f"left out {tmp_path / 'runs.csv'}: melanoma.py's ledger" in r.stdout
    assert "m  " in r.stdout and (tmp_path / "sub.csv").exists()
    alone = run_cli(ROOT / "ensemble.py", tmp_path / "runs.csv", "--out", tmp_path / "s2.csv")
    assert alone.returncode == 2 and "only melanoma.py's ledger" in alone.stderr


# ----------------------------------------------------------------------------------------------
# The commands as written: a default data location; ensemble.py finds the runs' patient ids

def test_default_data_location_then_ensemble_finds_the_runs_patient_ids(tiny_data, tmp_path):
    shutil.copytree(tiny_data, tmp_path / "data")
    r = run_cli(ROOT / "melanoma.py", *TINY, "--epochs", "1", "--fold", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith("data: data (the first default location")
    info = json.loads((tmp_path / "preds" / "test_efficientnet_32_fold1.json").read_text())
    assert info["args"]["data_dir"] == str(tmp_path / "data")  # resolved: the JSON serves anywhere
    assert info["args"]["folds"] == str(tmp_path / "data" / "folds.csv")
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "preds").glob("*.csv"))
    e = run_cli(ROOT / "ensemble.py", *files, "--bootstrap", "50", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    report = json.loads((tmp_path / "submission.json").read_text())
    assert report["bootstrap_over"] == "patients" and "recorded by the runs" in e.stdout


def test_no_data_in_any_default_location_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # a data/ folder without a competition layout does not count
    err = refused_run([*TINY], capsys, "no competition data found in data or /kaggle/input/",
                      "kaggle competitions download -c siim-isic-melanoma-classification", "--demo")
    assert "--data-dir" in err and not (tmp_path / "preds").exists()


def test_help_shows_the_default_data_locations(capsys):
    with pytest.raises(SystemExit):
        melanoma.get_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # help text is wrapped, even inside a path
    assert "data/;melanoma.pyalsolooksin/kaggle/input/siim-isic-melanoma-classification" in text


# ----------------------------------------------------------------------------------------------
# ensemble.py



def write_model(d, name, folds, test, rows=None):
    """OOF files {name}_fold{k}_oof.csv from {k: (targets, preds)} and test files from test preds."""
    start = 0
    for k, (y, p) in folds.items():
        names = rows[start:start + len(y)] if rows else [f"img{start + i}" for i in range(len(y))]
        pd.DataFrame(dict(image_name=names, target=y, pred=p, fold=k)).to_csv(d / f"{name}_fold{k}_oof.csv", index=False)
        pd.DataFrame(dict(image_name=[f"t{i}" for i in range(len(test))], target=test)).to_csv(
            d / f"{name}_fold{k}_test.csv", index=False)
        start += len(y)


def run_ensemble(d, *args, expect=0):
    files = sorted(str(p) for p in d.glob("*.csv") if p.name != "sub.csv")
    r = run_cli(ROOT / "ensemble.py", *files, "--out", d / "sub.csv", "--bootstrap", "200", *args, cwd=d)
    assert r.returncode == expect, r.stderr
    return r


Y = [0, 1, 0, 1, 0, 0]


def test_ensemble_mean_and_rank_match_hand_computed_values(tmp_path):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.1, 0.4, 0.3, 0.2])
    write_model(tmp_path, "b", {0: (Y, [.2, .6, .1, .8, .7, .3])}, [0.8, 0.1, 0.5, 0.3])
    run_ensemble(tmp_path)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["image_name"].tolist() == ["t0", "t1", "t2", "t3"]
    assert np.allclose(sub["target"], [0.45, 0.25, 0.4, 0.25])
    r = run_ensemble(tmp_path, "--method", "rank")
    # ranks a: 1,4,3,2 and b: 4,1,3,2 -> means 2.5, 2.5, 3, 2 -> rescaled to [0, 1]
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], [0.5, 0.5, 1, 0])
    report = json.loads((tmp_path / "sub.json").read_text())
    assert report["models"]["a"]["auc"] == pytest.approx(1.0) and report["models"]["b"]["auc"] == pytest.approx(0.875)
    assert report["ensemble"]["mean"]["auc"] == pytest.approx(1.0)  # mean .15 .75 .15 .75 .5 .35
    assert "CV AUC" in r.stdout and "Pearson / Spearman" in r.stdout
    heat_map = tmp_path / "sub_correlation.png"
    assert f"and {heat_map}" in r.stdout and heat_map.read_bytes().startswith(b"\x89PNG")
    with Image.open(heat_map) as image:
        assert image.format == "PNG" and image.mode == "RGBA" and min(image.size) > 200


def test_ensemble_weighted_picks_the_informative_model_and_stack_is_a_logistic_regression(tmp_path):
    r = np.random.default_rng(0)
    y = (r.random(400) < 0.2).astype(int)
    good = np.clip(0.3 * y + 0.7 * r.random(400), 0, 1)
    noise = r.random(400)
    test_good, test_noise = r.random(50), r.random(50)
    folds = {k: slice(k * 100, (k + 1) * 100) for k in range(4)}
    write_model(tmp_path, "good", {k: (y[s], good[s]) for k, s in folds.items()}, test_good)
    write_model(tmp_path, "noise", {k: (y[s], noise[s]) for k, s in folds.items()}, test_noise)
    run_ensemble(tmp_path, "--method", "weighted")
    report = json.loads((tmp_path / "sub.json").read_text())
    w = dict(zip(report["models"], report["ensemble"]["weighted"]["weights"]))
    assert w["good"] > 0.8 and sum(w.values()) == pytest.approx(1)
    sub = pd.read_csv(tmp_path / "sub.csv")["target"].to_numpy()
    assert np.allclose(sub, w["good"] * test_good + w["noise"] * test_noise)
    run_ensemble(tmp_path, "--method", "stack")
    from sklearn.linear_model import LogisticRegression
    names = list(json.loads((tmp_path / "sub.json").read_text())["models"])
    X = np.column_stack([{"good": good, "noise": noise}[n] for n in names])
    Z = np.column_stack([{"good": test_good, "noise": test_noise}[n] for n in names])
    ref = LogisticRegression(C=1.0).fit(ensemble.logit(X), y).predict_proba(ensemble.logit(Z))[:, 1]
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], ref, atol=1e-6)


def test_nested_cv_reports_no_gain_for_a_blend_fitted_on_noise():
    r = np.random.default_rng(1)
    y = (r.random(3000) < 0.1).astype(int)
    X = r.random((3000, 6))
    folds = np.arange(3000) % 5
    singles = [ensemble.auc(y, X[:, j]) for j in range(6)]
    for method in ("weighted", "stack"):
        in_sample = ensemble.auc(y, ensemble.fit(method, X, y)[0](X))
        nested = ensemble.auc(y, ensemble.nested_oof(method, X, y, folds))
        assert nested < in_sample and nested < max(singles) + 0.01 and nested < 0.53
    assert ensemble.auc(y, ensemble.fit("weighted", X, y)[0](X)) > max(singles)  # in-sample it would "gain"


def test_cv_auc_is_over_concatenated_oof_not_a_mean_of_folds(tmp_path):
    # each fold ranks perfectly, but fold 1's scores all sit above fold 0's
    write_model(tmp_path, "m", {0: ([0, 0, 1], [.1, .2, .3]), 1: ([0, 0, 1], [.6, .7, .8])}, [0.5])
    run_ensemble(tmp_path)
    info = json.loads((tmp_path / "sub.json").read_text())["models"]["m"]
    from sklearn.metrics import roc_auc_score
    assert info["auc"] == pytest.approx(roc_auc_score([0, 0, 1, 0, 0, 1], [.1, .2, .3, .6, .7, .8]))
    assert info["auc"] == pytest.approx(0.75) and info["folds"] == [0, 1]


def test_ensemble_auc_and_bootstrap_over_patients(tmp_path):
    r = np.random.default_rng(2)
    y, p = (r.random(500) < 0.1).astype(float), np.round(r.random(500), 2)
    from sklearn.metrics import roc_auc_score
    assert ensemble.auc(y, p) == pytest.approx(roc_auc_score(y, p))
    p = p + 0.3 * y
    by_image = ensemble.bootstrap_interval(y, p, np.arange(500), 500)
    by_patient = ensemble.bootstrap_interval(y, p, np.repeat(np.arange(50), 10), 500)
    assert by_image[0] < ensemble.auc(y, p) < by_image[1]
    write_model(tmp_path, "m", {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.1, .9, .2, .7, .3, .4])}, [0.5])
    pd.DataFrame(dict(image_name=[f"img{i}" for i in range(12)], patient_id=[f"p{i // 3}" for i in range(12)])).to_csv(
        tmp_path / "folds.csv.txt", index=False)
    run_ensemble(tmp_path, "--folds", tmp_path / "folds.csv.txt")
    assert json.loads((tmp_path / "sub.json").read_text())["bootstrap_over"] == "patients"
    assert "absent.csv: no such file" in run_ensemble(tmp_path, "--folds", "absent.csv", expect=2).stderr
    made(tmp_path / "no_ids.txt", "image_name,fold\nimg0,0\n")
    r = run_ensemble(tmp_path, "--folds", "no_ids.txt")
    assert "over images" in r.stdout and "no_ids.txt has no patient_id column" in r.stdout
    assert json.loads((tmp_path / "sub.json").read_text())["bootstrap_over"] == "images"
    assert by_patient[1] - by_patient[0] > 0  # patients give their own, valid interval


def test_ensemble_plain_submission_and_different_coverage(tmp_path):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    write_model(tmp_path, "b", {0: (Y, [.2, .6, .1, .8, .5, .3])}, [0.6, 0.8])
    r = run_ensemble(tmp_path)
    assert "different OOF images" in r.stdout
    report = json.loads((tmp_path / "sub.json").read_text())
    assert report["models"]["a"]["n_oof"] == 12 and report["correlation_on"].startswith("OOF predictions of 6")
    pd.DataFrame(dict(image_name=["t1", "t0"], target=[0.9, 0.1])).to_csv(tmp_path / "public.csv", index=False)
    r = run_ensemble(tmp_path)
    assert "no OOF (test only)" in r.stdout
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sub["image_name"].tolist() == ["t0", "t1"] and np.allclose(sub["target"], [(.2 + .6 + .1) / 3, (.4 + .8 + .9) / 3])
    err = run_ensemble(tmp_path, "--method", "weighted", expect=2)
    assert "public" in err.stderr and "have none" in err.stderr


def test_ensemble_models_without_shared_oof_images(tmp_path):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    write_model(tmp_path, "b", {1: (Y, [.2, .6, .1, .8, .7, .3])}, [0.6, 0.8], rows=[f"img{i}" for i in range(6, 12)])
    r = run_ensemble(tmp_path)
    assert "not scored: the models share no OOF images" in r.stdout
    assert np.allclose(pd.read_csv(tmp_path / "sub.csv")["target"], [0.4, 0.6])
    assert "share no OOF images" in run_ensemble(tmp_path, "--method", "stack", expect=2).stderr


def csv_of(path, **cols):
    pd.DataFrame(cols).to_csv(path, index=False)


def model_x(d, **oof):
    """Model x: a valid test file and an OOF file made of `oof`."""
    csv_of(d / "x_fold0_test.csv", image_name=["t0", "t1"], target=[.1, .2])
    csv_of(d / "x_fold0_oof.csv", **oof)


def refused(d, *argv):
    """ensemble.py run in d: exit code 2 and one line on stderr, no traceback, nothing written."""
    before = sorted(d.rglob("*"))
    r = run_cli(ROOT / "ensemble.py", *argv, cwd=d)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(d.rglob("*")) == before
    return lines[0]


def made(path, text=None):
    """path, made a folder (text None) or a file holding text."""
    path.mkdir() if text is None else path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "absent.csv: no such file"),
    (lambda d: (d / "x_fold0_test.csv").write_bytes(b"\xff\xfe\x00garbage\x00"), "x_fold0_test.csv"),
    (lambda d: made(d / "x_fold0_test.csv"), "x_fold0_test.csv: is a folder"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t1"], pred=[.1, .2]), "missing column(s) target"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=[], target=[]), "x_fold0_test.csv: a header and no rows"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t0"], target=[.1, .2]),
     "x_fold0_test.csv: row 3: duplicate image_name t0"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", ""], target=[.1, .2]), "row 3: image_name is empty"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0 ", "t1"], target=[.1, .2]),
     "x_fold0_test.csv: row 2: image_name 't0 ' has surrounding spaces"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t9"], target=[.1, .2]), "hold different test images"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t9"], target=[.1, .2]), "x_fold0_test.csv lacks t1"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t1"], target=[.1, np.nan]), "row 3: target"),
    (lambda d: model_x(d, image_name=["img0"], target=[0], pred=[np.inf], fold=0), "row 2: pred"),
    (lambda d: model_x(d, image_name=["img0"], target=[2], pred=[.5], fold=0),
     "x_fold0_oof.csv: row 2: target must be 0 or 1, got '2'"),
    (lambda d: model_x(d, image_name=["img0", "img1"], target=[0, .5], pred=[.5, .5], fold=0),
     "x_fold0_oof.csv: row 3: target must be 0 or 1, got '0.5'"),
    (lambda d: model_x(d, image_name=["img0"], target=[0], pred=[.5], fold=[1.5]),
     "x_fold0_oof.csv: row 2: fold must be a whole number, got '1.5'"),
    (lambda d: model_x(d, image_name=["img0", "img1"], target=[0, 1], pred=[-2.5, 3], fold=0),
     "x_fold0_oof.csv: pred ranges over [-2.5, 3], not probabilities in [0, 1] (--method rank takes any scores)"),
    (lambda d: csv_of(d / "x_fold0_test.csv", image_name=["t0", "t1"], target=[.1, 1.2]), "target ranges over [0.1, 1.2]"),
    (lambda d: csv_of(d / "a_fold5_oof.csv", image_name=["img0"], target=[0], pred=[.5], fold=5), "overlap on image img0"),
    (lambda d: model_x(d, image_name=["img1"], target=[0], pred=[.5], fold=0), "img1 disagrees"),
    (lambda d: shutil.copy(d / "a_fold0_oof.csv", made(d / "b")), "a_fold0_oof.csv and b/a_fold0_oof.csv: the same file name"),
])
def test_ensemble_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, make, message):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    make(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.csv"))
    files += ["absent.csv"] if "absent" in message else []
    assert message in refused(tmp_path, *files, "--out", "out/sub.csv")


A = ["a_fold0_oof.csv", "a_fold0_test.csv"]


@pytest.mark.parametrize("argv, message", [
    (lambda d: [*A, "a_fold0_oof.csv"], "a_fold0_oof.csv and a_fold0_oof.csv: the same file name twice"),
    (lambda d: [*A, "--bootstrap", "-1"], "argument --bootstrap: must be 0 or more, got -1"),
    (lambda d: ["absent_fold0_oof.csv", "--out", "sub.json"], "--out sub.json: the report goes beside"),
    (lambda d: [*A, "--out", made(d / "o")], "o: a folder, not a file"),
    (lambda d: [*A, "--out", made(d / "sub.json") / ".." / "sub.csv"], "sub.json: a folder, not a file"),
    (lambda d: [*A, "--out", made(d / "f", "") / "out" / "sub.csv"], "f is a file, not a folder"),
    (lambda d: [*A, "--out", "a_fold0_test.csv"], "--out a_fold0_test.csv: would overwrite the input a_fold0_test.csv"),
    (lambda d: [*A, "--folds", made(d / "f").name], "folds file f: is a folder"),
    (lambda d: [*A, "--folds", made(d / "f.csv", "image_name,patient_id\nimg0,p0\nimg1,\n")],
     "f.csv: row 3: patient_id is empty"),
    (lambda d: [*A, "--folds", made(d / "f.csv", "image_name,patient_id\nimg0,p0\nimg0,p1\n")],
     "f.csv: row 3: duplicate image_name img0"),
    (lambda d: [*A, "--folds", made(d / "f.csv", "image_name,patient_id\n img0,p0\n")],
     "f.csv: row 2: image_name ' img0' has surrounding spaces"),
    (lambda d: [*A, "--folds", made(d / "f.csv", 'image_name,patient_id\n"img0,p0\n')], "f.csv: cannot read it as CSV"),
    (lambda d: [*A, "--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    (lambda d: [*A, "--out", ""], "argument --out: empty; give a value"),
    (lambda d: [*A, "--out", "."], "--out '.': give a file path"),
    (lambda d: [*A, "--out", (os.mkfifo(d / "pipe.csv"), "pipe.csv")[1]], "pipe.csv: not a regular file"),  # /dev/null
    (lambda d: [*A, "--folds", made(d / "f.csv", "image_name,patient_id\nimg0,p0\n"), "--out", "f.csv"],
     "would overwrite the input"),
    (lambda d: [*A, "--out", "a_fold1.csv"], "--out a_fold1.csv: a_fold1.csv is the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "b_fold2_oof.csv"], "the name of a file melanoma.py writes"),
    # issue 22: never replace the ledger or a run's other outputs
    (lambda d: [*A, "--out", "runs.csv"], "runs.csv is the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "preds/m_predict.csv"], "m_predict.csv is the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "m_lr_find.csv"], "the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "m_fold0_explain.csv"], "the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "folds.csv"], "the name of a file melanoma.py writes"),
    (lambda d: [*A, "--out", "preds/logs"], "the name of a file melanoma.py writes"),
])
def test_ensemble_bad_flags_outputs_and_folds_are_one_line_errors(tmp_path, argv, message):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    assert message in refused(tmp_path, *argv(tmp_path))


def test_ensemble_rank_takes_logits_and_keeps_their_order_mean_refuses_them(tmp_path):
    logits = [2.0, -3.0, 0.5, 7.0]
    write_model(tmp_path, "a", {0: (Y, [-2, 3, -1, 1, 0, .5]), 1: (Y, [-2, 2, -1, 1, 0, .5])}, logits)
    r = run_ensemble(tmp_path, "--method", "rank")
    sub = pd.read_csv(tmp_path / "sub.csv")["target"].to_numpy()
    assert np.array_equal(np.argsort(sub), np.argsort(logits)) and sub.min() == 0 and sub.max() == 1
    report = json.loads((tmp_path / "sub.json").read_text())
    assert report["ensemble"]["rank"]["auc"] == pytest.approx(1.0)
    assert "outside [0, 1]" in report["ensemble"]["mean"]["note"] and "outside [0, 1]" in r.stdout
    err = run_ensemble(tmp_path, expect=2).stderr
    assert "a_fold0_oof.csv: pred ranges over [-2, 3], not probabilities" in err and "--method rank" in err


def test_ensemble_report_is_json_without_nan(tmp_path):
    write_model(tmp_path, "a", {0: ([0, 0, 0], [.1, .2, .3])}, [0.5, 0.5])  # one class, constant test
    write_model(tmp_path, "b", {0: ([0, 0, 0], [.3, .1, .2])}, [0.2, 0.4])
    run_ensemble(tmp_path, "--bootstrap", "0")

    def no_nan(token):
        raise ValueError(f"{token} in the report")

    report = json.loads((tmp_path / "sub.json").read_text(), parse_constant=no_nan)
    assert report["models"]["a"]["auc"] is None and report["models"]["a"]["ci95"] == [None, None]
    assert report["pearson"]["a"]["b"] is None


def write_run(d, name, k, folds):
    """The {name}_fold{k}.json of a run given --folds `folds`, as melanoma.py writes it."""
    run = dict(fold=k, oof_auc=float("nan"), args=dict(folds=str(folds), data_dir="data"))
    (d / f"{name}_fold{k}.json").write_text(json.dumps(run))


def test_ensemble_finds_the_patient_ids_the_runs_recorded(tmp_path):
    project, elsewhere = tmp_path / "project", made(tmp_path / "elsewhere")
    preds = project / "preds"
    preds.mkdir(parents=True)
    ids = pd.DataFrame(dict(image_name=[f"img{i}" for i in range(12)], patient_id=[f"p{i // 3}" for i in range(12)]))
    ids.to_csv(made(project / "data") / "folds.csv", index=False)
    for name in "ab":
        write_model(preds, name, {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.2, .6, .1, .8, .7, .3])}, [0.2, 0.4])
        for k in (0, 1):
            write_run(preds, name, k, "data/folds.csv")  # relative to project/, where the runs started
    files = sorted(preds.glob("*.csv"))

    def report_from(cwd, *args):
        r = run_cli(ROOT / "ensemble.py", *files, "--out", tmp_path / "out" / "sub.csv", "--bootstrap", "50", *args,
                    cwd=cwd)
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / "out" / "sub.json").read_text())

    report = report_from(elsewhere)
    assert report["bootstrap_over"] == "patients"
    assert report["patient_ids"] == f"patient ids from {project / 'data' / 'folds.csv'}, recorded by the runs"
    ids.to_csv(elsewhere / "mine.csv", index=False)
    assert report_from(elsewhere, "--folds", "mine.csv")["patient_ids"] == "patient ids from mine.csv, given by --folds"
    write_run(preds, "b", 1, elsewhere / "mine.csv")
    report = report_from(elsewhere)
    assert report["bootstrap_over"] == "images" and report["patient_ids"] is None
    assert f"different folds files: {project / 'data' / 'folds.csv'}" in report["notes"][0]
    assert str(elsewhere / "mine.csv") in report["notes"][0]
    ids.to_csv(elsewhere / "folds.csv", index=False)
    assert report_from(elsewhere)["patient_ids"] == "patient ids from folds.csv, in the current folder"
    (preds / "a_fold0.json").write_text("{")
    assert "a_fold0.json: cannot read the run's JSON" in refused(elsewhere, *files, "--out", "out/sub.csv")


def test_ensemble_imports_no_torch():
    r = run_cli("-c", "import ensemble, sys; print('torch' in sys.modules, 'sklearn' in sys.modules)")
    assert r.stdout.split() == ["False", "False"]


def test_ensemble_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    path = tmp_path / "new" / "f.txt"
    ensemble.atomic_write(path, lambda tmp: Path(tmp).write_text("old"))

    def crash(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(ensemble.DataError, match=r"f.txt: cannot write it \(disk full\); nothing was replaced"):
        ensemble.atomic_write(path, crash)
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["f.txt"]
    # several files: all new or all old (ensemble.py's submission, report and heat map on a full disk)
    other = path.parent / "g.txt"
    with pytest.raises(ensemble.DataError, match="g.txt: cannot write it"):
        ensemble.atomic_write_all({path: lambda tmp: Path(tmp).write_text("new"), other: crash})
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    files = " ".join(str(p) for p in tmp_path.glob("*.csv"))
    for umask, mode in (("022", 0o644), ("077", 0o600)):
        out = tmp_path / f"out{umask}" / "sub.csv"
        r = subprocess.run(["sh", "-c", f"umask {umask}; {sys.executable} {ROOT / 'ensemble.py'} {files} "
                            f"--out {out} --bootstrap 0"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert [p.stat().st_mode & 0o777 for p in (out, out.with_suffix(".json"))] == [mode, mode]


def test_ensemble_names_are_text_in_the_heat_map(tmp_path):
    write_model(tmp_path, "p$_$", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    write_model(tmp_path, "q", {0: (Y, [.2, .6, .1, .8, .7, .3])}, [0.6, 0.8])
    run_ensemble(tmp_path)
    with Image.open(tmp_path / "sub_correlation.png") as im:
        assert im.format == "PNG"


def test_ensemble_runs_without_test_predictions_get_a_report_and_no_submission(tmp_path):
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4]), 1: (Y, [.2, .8, .1, .6, .3, .5])}, [0.2])
    write_model(tmp_path, "b", {0: (Y, [.2, .6, .1, .8, .7, .3]), 1: (Y, [.3, .7, .2, .9, .1, .4])}, [0.6])
    for f in tmp_path.glob("*_test.csv"):
        f.unlink()
    r = run_ensemble(tmp_path, "--method", "weighted")
    assert "no submission: model(s) a, b have no test predictions" in r.stdout
    assert not (tmp_path / "sub.csv").exists()
    report = json.loads((tmp_path / "sub.json").read_text())
    assert report["models"]["a"]["auc"] is not None and report["ensemble"]["weighted"]["auc"] is not None


# ----------------------------------------------------------------------------------------------
# LR range test: the verdict on the curve's noise (issue 21), --lr-find with --meta

def lr_curve(shape, sigma, seed=0, steps=200):
    """A synthetic range test over 1e-7 to 1: loss = shape(log10 rate) + gaussian noise."""
    lr = np.logspace(-7, 0, steps)
    loss = shape(np.log10(lr)) + np.random.default_rng(seed).normal(0, sigma, steps)
    return pd.DataFrame(dict(step=np.arange(1, steps + 1), lr=lr, loss=loss))


def falls_at(x, centre, depth=0.4):
    """A fall of `depth` from 0.69 (a guess of 0.5), fastest at the rate 10**centre."""
    return 0.69 - depth / (1 + np.exp(-(x - centre) / 0.3))


@pytest.mark.parametrize("seed", range(5))
def test_lr_range_verdict_clean_valley_picks_within_2x_of_the_fastest_fall(seed):
    curve = lr_curve(lambda x: falls_at(x, -3) + 0.5 * np.exp((x + 0.5) / 0.25), 0.05, seed)  # diverges past 0.1
    r = melanoma.read_lr_curve(curve, entropy=0.62)
    assert r["verdict"] == "valley" and 5e-4 <= r["lr_max"] <= 2e-3 and r["lr_min"] == pytest.approx(r["lr_max"] / 40)
    assert r["fall"][0] < 1e-3 < r["fall"][1]
    line = melanoma.verdict_line(r)
    assert line.startswith(f"valley: suggested --lr-min {r['lr_min']:.1e} --lr-max {r['lr_max']:.1e}") and "\n" not in line


def test_lr_range_verdict_names_the_issues_flat_curve_flat_and_reads_no_rate():
    # issue 21's real curve: the mean loss per decade of rate, per-step noise 0.12, 32 % melanomas per epoch
    decades = np.array([0.679, 0.678, 0.671, 0.660, 0.707, 0.675, 0.813])
    for seed in range(5):
        r = melanoma.read_lr_curve(lr_curve(lambda x: decades[np.clip((x + 7).astype(int), 0, 6)], 0.12, seed),
                                   entropy=melanoma.class_mix_entropy([1] * 32 + [0] * 68))
        assert r["verdict"] == "flat" and r["lr_max"] is None and r["lr_min"] is None and r["fall"] is None
        line = melanoma.verdict_line(r)
        assert line.startswith("flat: ") and "suggested" not in line and "\n" not in line
        assert all(f in line for f in ("--lr-find-steps", "--batch-size", "--lr-find-batches"))


def test_lr_range_verdict_a_fall_only_to_the_class_mix_entropy_is_flat():
    curve = lr_curve(lambda x: falls_at(x, -3, depth=0.05) + np.exp((x + 0.5) / 0.25), 0.03)  # 0.69 -> 0.64
    assert melanoma.class_mix_entropy([0, 1]) == pytest.approx(np.log(2))
    assert melanoma.class_mix_entropy([1] * 32 + [0] * 68) == pytest.approx(0.627, abs=1e-3)
    assert melanoma.class_mix_entropy([0, 1, 2, 3, 3, 2]) == pytest.approx(-(np.log(1 / 6) + 2 * np.log(1 / 3)) / 3)
    assert melanoma.read_lr_curve(curve)["verdict"] == "valley"  # it falls clearly from its start ...
    assert melanoma.read_lr_curve(curve, entropy=0.64)["verdict"] == "flat"  # ... to the class mix's loss, no lower


def test_lr_range_verdict_a_curve_still_falling_at_the_end_says_so():
    r = melanoma.read_lr_curve(lr_curve(lambda x: falls_at(x, -0.5), 0.05), entropy=0.62)
    assert r["verdict"] == "still falling" and 1e-7 < r["lr_max"] < 1
    line = melanoma.verdict_line(r)
    assert line.startswith("still falling: suggested --lr-min") and "a higher --lr-find-end" in line
    # a non-finite loss that ended the test early is a divergence, however low the last finite loss
    assert melanoma.read_lr_curve(lr_curve(lambda x: falls_at(x, -0.5), 0.05), 0.62, diverged=True)["verdict"] == "valley"


def test_lr_range_noise_band_is_the_running_mean_and_its_standard_error():
    loss = np.random.default_rng(0).normal(0.7, 0.1, 400)
    loss[-5:] = 50  # diverged
    loss[200:] += np.random.default_rng(1).normal(0, 0.2, 200)  # learnt: the loss scatters more
    smoothed, se, noise = melanoma.noise_band(loss)
    assert smoothed[100] == pytest.approx(loss[80:121].mean()) and se[100] == pytest.approx(noise[100] / np.sqrt(41))
    assert noise[100] == pytest.approx(0.1, rel=0.2) and noise[300] == pytest.approx(np.hypot(0.1, 0.2), rel=0.2)
    assert se[0] == pytest.approx(noise[0] / np.sqrt(21))  # fewer steps at the ends: a wider band
    assert noise[-30] < 0.5  # not inflated by the five diverged steps


def test_lr_find_demo_run_writes_band_and_prints_a_one_line_verdict(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--lr-find", "--lr-find-steps", "30",
                                              "--lr-find-batches", "2", "--name", "t")])
    said = capsys.readouterr().out.strip().splitlines()[-1]
    curve = pd.read_csv(out / "t_lr_find.csv")
    assert list(curve.columns) == ["step", "lr", "loss", "smoothed", "band_low", "band_high"]
    assert 10 <= len(curve) <= 30 and np.allclose(np.diff(np.log(curve["lr"])), np.log(1e7) / 29)
    assert (curve["band_low"] < curve["smoothed"]).all() and (curve["smoothed"] < curve["band_high"]).all()
    verdict = said.removeprefix("lr-find: ").split(":")[0]
    assert verdict in ("valley", "flat", "still falling") and "steps up to" in said
    if verdict != "flat":
        lr_max = float(said.split("--lr-max ")[1].split(",")[0])
        assert curve["lr"].min() <= lr_max <= curve["lr"].max()
    assert is_png(out / "t_lr_find.png")


@pytest.mark.parametrize("value, message", [("0", "at least 1"), ("65", "at most 64")])
def test_lr_find_batches_out_of_bounds_is_one_line(tiny_data, tmp_path, capsys, value, message):
    refused_run(train_args(tiny_data, tmp_path / "out") + ["--lr-find", "--lr-find-batches", value], capsys,
                f"--lr-find-batches: must be {message}")


def test_lr_find_with_meta_tests_the_model_with_the_metadata_branch(tiny_data, tmp_path, capsys, monkeypatch):
    built = []
    model = melanoma.Extras.model
    monkeypatch.setattr(melanoma.Extras, "model", lambda *a, **kw: built.append(model(*a, **kw)) or built[-1])
    for name, extra in (("plain", []), ("meta", ["--meta"])):
        melanoma.main([str(a) for a in train_args(tiny_data, tmp_path, "--lr-find", "--lr-find-steps", "10",
                                                  "--lr-find-end", "1e-2", "--name", name, *extra)])
    assert built[0][0].meta is None and built[1][0].meta is not None
    assert (tmp_path / "plain_lr_find.csv").read_bytes() != (tmp_path / "meta_lr_find.csv").read_bytes()


# ----------------------------------------------------------------------------------------------
# Issue 22: what an outside hostile run broke (data loss, silent wrong results, late errors)

def test_a_ledger_without_its_final_newline_gets_its_next_row_on_a_line_of_its_own(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text(",".join(ensemble.LEDGER) + "\n2026-01-01 00:00:00,a,0,0.8,0.7,1.0,--size 48,o")  # no newline
    melanoma.append_run(path, dict(date="2026-01-02 00:00:00", name="b", fold=1, oof_auc=0.9, oof_auc_no_tta=0.8,
                                   wall_s=2.0, settings="", out="o"))
    assert ensemble.read_ledger(path)["name"].tolist() == ["a", "b"]


def test_a_ledger_that_cannot_take_a_row_is_refused_before_training(tiny_data, tmp_path, capsys):
    (tmp_path / "out" / "runs.csv").mkdir(parents=True)
    refused_run(train_args(tiny_data, tmp_path / "out"), capsys, "runs.csv", "a folder where an output file goes")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["runs.csv"]  # nothing trained


@pytest.mark.parametrize("content, names", [
    (",".join(ensemble.LEDGER) + "\n2026-01-01 00:00:00,a,0,0.8,0.7,1.0,--size 4", ["row 2", "out is empty"]),
    (",".join(ensemble.LEDGER) + '\n2026-01-01 00:00:00,a,0,0.8,0.7,1.0,"--name \'x",o\n', ["row 2", "unbalanced quote"]),
    # a field too many: pandas took the first column as an index and blamed a shifted one
    (",".join(ensemble.LEDGER) + "\n2026-01-01 00:00:00,a,0,0.8,0.7,1.0,--size 4,o,extra\n",
     ["row 2: more fields than the header's 8", "cannot read it as CSV"]),
])
def test_runs_refuses_a_ledger_cut_mid_row_or_with_an_unbalanced_quote(tmp_path, capsys, content, names):
    (tmp_path / "runs.csv").write_text(content)
    refused_run(["--runs", tmp_path], capsys, "runs.csv", *names)


def test_predict_converts_a_16_bit_png_instead_of_scoring_it_white(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    photos = tmp_path / "photos"
    photos.mkdir()
    grey = np.asarray(Image.open(first_image(tiny_data, "test")).convert("L"))
    Image.fromarray(grey).save(photos / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(photos / "sixteen.png")
    assert Image.open(photos / "sixteen.png").mode.startswith("I")
    melanoma.main(["--predict", str(photos), "--name", "tiny", "--out", str(out), "--tta", "0", "--num-workers", "0"])
    scores = pd.read_csv(out / "tiny_predict.csv").set_index("image_name")["target"]
    assert scores["sixteen.png"] == pytest.approx(scores["eight.png"], abs=1e-6)


def test_one_name_holding_two_recipes_is_refused_when_the_second_fold_starts(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(a) for a in train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "m")]
    melanoma.main(args + ["--fold", "0"])
    refused_run(args + ["--fold", "1", "--size", "48"], capsys, "--name m", "fold 0 (m_fold0.json)",
                "--size 32 (saved) vs 48 (now)", "its own --name")
    assert not list(out.glob("m_fold1*"))


@pytest.mark.parametrize("flag", ["--predict", "--runs", "--augs", "--init-from", "--weights", "--out", "--folds",
                                  "--data-dir", "--cache", "--model", "--external"])
def test_empty_values_from_an_unset_shell_variable_are_refused(tiny_data, tmp_path, capsys, flag):
    refused_run(train_args(tiny_data, tmp_path / "out") + [flag, ""], capsys, flag, "empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a\nb", "a\rb"])
def test_a_name_on_two_lines_is_refused(tiny_data, tmp_path, capsys, name):
    refused_run(train_args(tiny_data, tmp_path / "out") + ["--name", name], capsys, "--name", "on one line")


def test_meta_refuses_text_ages_and_encodes_an_all_empty_age(data, tmp_path, capsys):
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    train.assign(age_approx=["forty"] + list(train["age_approx"][1:])).to_csv(data / "train.csv", index=False)
    refused_run(train_args(data, tmp_path / "out", "--meta"), capsys, "train.csv", "row 2",
                "age_approx must be a finite number or empty, got 'forty'")
    train.assign(age_approx="").to_csv(data / "train.csv", index=False)
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(data, out, "--meta", "--epochs", "1", "--tta", "0", "--name", "e")])
    spec = json.loads((out / "e_fold0.json").read_text())["meta"]
    assert spec["age"] == [0.0, 1.0]  # no age known: the missing indicator carries it
    melanoma.main(["--predict", str(data / "test.csv"), "--name", "e", "--out", str(out), "--tta", "0",
                   "--num-workers", "0"])
    assert pd.read_csv(out / "e_predict.csv")["target"].between(0, 1).all()


def jpeg_with_thumbnail_before_its_scan(path, cut):
    """A JPEG with an APP1 segment holding a whole thumbnail JPEG just before its first scan, cut
    `cut` bytes after the scan starts: its last kilobyte holds the thumbnail's end marker."""
    main = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)).save(main, "JPEG")
    thumb = io.BytesIO()
    smooth_image(8, 8, 1).save(thumb, "JPEG", quality=50)
    main, thumb = main.getvalue(), thumb.getvalue()
    sos = main.index(b"\xff\xda")
    app1 = b"\xff\xe1" + (2 + 6 + len(thumb)).to_bytes(2, "big") + b"Exif\0\0" + thumb
    whole = main[:sos] + app1 + main[sos:]
    path.write_bytes(whole[:sos + len(app1) + cut])
    return path


def test_a_jpeg_cut_after_an_embedded_thumbnail_is_refused_up_front(tmp_path):
    whole = jpeg_with_thumbnail_before_its_scan(tmp_path / "whole.jpg", 10**6)
    melanoma.check_images([str(whole)])  # complete: passes
    cut = jpeg_with_thumbnail_before_its_scan(tmp_path / "cut.jpg", 200)
    assert b"\xff\xd9" in cut.read_bytes()[-1024:]
    Image.open(cut).size  # its header reads
    with pytest.raises(melanoma.DataError, match="truncated"):
        melanoma.check_images([str(cut)])


def test_init_from_weights_that_do_not_fit_a_later_fold_are_refused_before_the_first_trains(tiny_data, trained_run,
                                                                                         tmp_path, capsys):
    from safetensors.torch import save_file
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    other = net("test_resnet")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, out / "tiny_fold1.safetensors")
    refused_run(train_args(tiny_data, out, "--init-from", "tiny", "--fold", "0", "1", "--name", "big"), capsys,
                "tiny_fold1.safetensors", "does not fit")
    assert not list(out.glob("big*"))


def test_init_from_a_linear_head_with_head_mlp_names_the_head_and_trains(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--head", "mlp",
                                              "--init-from", "tiny", "--name", "mlp")])
    log = capsys.readouterr().out
    assert "the body loads; " in log and "head.weight there only" in log and "another --head" in log
    assert (out / "mlp_fold0.json").is_file()


def test_a_full_disk_is_one_line_and_leaves_the_fold_unfinished(tiny_data, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    args = train_args(tiny_data, out, "--epochs", "1", "--tta", "0")
    melanoma.main([str(a) for a in args])
    write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda p, data: full() if ".safetensors" in p.name else write_bytes(p, data))
    refused_run(args + ["--tta", "1", "--overwrite"], capsys,
                "safetensors: cannot write it (No space left on device)", "not finished")
    # the old JSON went first: the fold, half replaced, is not taken for finished
    assert not list(out.glob("*.json")) and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("tool, output", [(["--lr-find"], "x_lr_find.csv"), (["--lr-find"], "x_lr_find.png")])
def test_lr_find_output_names_that_are_folders_are_refused_up_front(tiny_data, tmp_path, capsys, tool, output):
    (tmp_path / "out" / output).mkdir(parents=True)
    refused_run(train_args(tiny_data, tmp_path / "out", "--name", "x", *tool), capsys, output,
                "a folder where an output file goes")


@pytest.mark.parametrize("output, extra", [("tiny_predict.csv", []), ("tiny_predict_skipped.tsv", []),
                                           ("tiny_fold0_explain.png", ["--explain", "1"])])
def test_predict_and_explain_output_names_that_are_folders_are_refused_up_front(tiny_data, trained_run, tmp_path,
                                                                             capsys, output, extra):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    (out / output).mkdir()
    refused_run(["--predict", tiny_data / "test.csv", "--name", "tiny", "--out", out, "--tta", "0", *extra], capsys,
                output, "a folder where an output file goes")
    assert not (out / "tiny_predict.csv").is_file()


def test_explain_on_a_read_only_out_is_refused_up_front(trained_run, tmp_path, capsys, monkeypatch):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(melanoma.tempfile, "TemporaryFile", read_only)
    refused_run(["--explain", "1", "--name", "tiny", "--out", out], capsys, "--out", "cannot write in")
    assert not list(out.glob("*_explain.png"))


@pytest.mark.parametrize("text, names", [
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
     'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n', ["aliases"]),
    ("- name: RandomHorizontalFlip\n" * 10000, ["larger than 65536 bytes"]),
    ("- {name: RandomHorizontalFlip}\n" * 1000, ["at most 100 augmentations", "1000"]),
    ("[" + ",".join(["{name: RandomHorizontalFlip}"] * 101) + "]", ["at most 100 augmentations"]),
], ids=["billion-laughs", "64KiB", "1000-entries", "101-entries"])
def test_augs_files_are_bounded_and_take_no_aliases(tiny_data, tmp_path, capsys, text, names):
    (tmp_path / "augs.yaml").write_text(text)
    start = time.time()
    refused_run(train_args(tiny_data, tmp_path / "out", "--augs", tmp_path / "augs.yaml"), capsys, "--augs", *names)
    assert time.time() - start < 20


def test_skip_bad_skips_a_truncated_png(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    photos = tmp_path / "photos"
    photos.mkdir()
    smooth_image(64, 48).save(photos / "good.png")
    (photos / "cut.png").write_bytes((photos / "good.png").read_bytes()[:-40])
    melanoma.main(["--predict", str(photos), "--name", "tiny", "--out", str(out), "--tta", "0", "--skip-bad",
                   "--num-workers", "0"])
    assert pd.read_csv(out / "tiny_predict.csv")["image_name"].tolist() == ["good.png"]
    assert "not a complete PNG" in (out / "tiny_predict_skipped.tsv").read_text()


def test_abbreviated_flags_are_refused(tiny_data, tmp_path, capsys):
    refused_run(["--dem", "--out", tmp_path / "out"], capsys, "unrecognized arguments: --dem")


def test_ctrl_c_is_one_line_that_says_how_to_resume(tiny_data, tmp_path):
    p = subprocess.Popen([sys.executable, "melanoma.py", *map(str, train_args(tiny_data, tmp_path / "out",
                          "--epochs", "200"))], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "out").glob("*_last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("stopped:") and "--resume" in err


def test_a_nan_loss_from_the_augmentation_names_the_augs_file(tiny_data, tmp_path, capsys):
    (tmp_path / "augs.yaml").write_text("- name: RandomGaussianNoise\n  std: 1.0e+30\n  p: 1.0\n")
    refused_run(train_args(tiny_data, tmp_path / "out", "--augs", tmp_path / "augs.yaml"), capsys,
                "loss is", "augs.yaml")


def test_explain_zero_is_refused_not_mistaken_for_training(tmp_path, capsys):
    refused_run(["--explain", "0", "--name", "x", "--out", tmp_path], capsys, "--explain: must be at least 1")


def test_help_names_the_skipped_list_as_written(capsys):
    with pytest.raises(SystemExit):
        melanoma.get_args(["--help"])
    out = capsys.readouterr().out
    assert "{name}_predict_skipped.tsv" in out and "_predict_skipped.csv" not in out


# ----------------------------------------------------------------------------------------------
# --log-with: experiment trackers through accelerate, read back with TensorBoard's own reader

def tensorboard_run(folder):
    """A TensorBoard run folder as TensorBoard reads it (every event kept, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    run.Reload()
    return run


def scalars(run, tag):
    return [e.step for e in run.Scalars(tag)], np.array([e.value for e in run.Scalars(tag)])


def check_fold_run(run, info, batch):
    """The fold's tracker run holds each step's loss once, each epoch's figures at its last step, and
    the OOF AUCs and plots at the last step: the figures of the fold's JSON."""
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


def test_log_with_tensorboard_logs_the_fold_and_a_resumed_fold_repeats_no_step(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save = melanoma.Extras.epoch

    def keep_the_first_epochs_checkpoint(self, fold, *a):
        save(self, fold, *a)
        if not (tmp_path / "epoch1.pt").exists():
            shutil.copy(melanoma.fold_file(self.args, fold, "_last.pt"), tmp_path / "epoch1.pt")

    monkeypatch.setattr(melanoma.Extras, "epoch", keep_the_first_epochs_checkpoint)
    args = [str(a) for a in train_args(tiny_data, out, "--name", "t", "--log-with", "tensorboard")]
    melanoma.main(args)
    info = json.loads((out / "t_fold0.json").read_text())
    loss = check_fold_run(tensorboard_run(out / "logs" / "t_fold0"), info, 16)
    # a run killed at the worst moment: epoch 2 logged to its end, but only epoch 1's checkpoint saved
    (out / "t_fold0.json").unlink()
    shutil.copy(tmp_path / "epoch1.pt", out / "t_fold0_last.pt")
    melanoma.main(args + ["--resume"])
    info = json.loads((out / "t_fold0.json").read_text())
    assert check_fold_run(tensorboard_run(out / "logs" / "t_fold0"), info, 16) == pytest.approx(loss, abs=1e-6)
    hparams = list((out / "logs" / "t_fold0").glob("*/hparams.yml"))
    assert hparams and "lr_max: 0.003" in hparams[0].read_text() and "fold: 0" in hparams[0].read_text()


def test_log_with_lr_find_logs_its_curve_and_explain_its_grids(tiny_data, trained_run, tmp_path):
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--lr-find", "--lr-find-steps", "20", "--name", "t",
                                              "--log-with", "tensorboard")])
    assert sorted(p.name for p in out.iterdir()) == ["logs", "t_lr_find.csv", "t_lr_find.png"]
    curve = pd.read_csv(out / "t_lr_find.csv")
    run = tensorboard_run(out / "logs" / "t_lr_find")
    for column in ("loss", "smoothed", "lr"):
        steps, values = scalars(run, f"lr_find/{column}")
        assert steps == curve["step"].tolist() and values == pytest.approx(curve[column].to_numpy(), rel=1e-5)
    assert [e.step for e in run.Images("lr_find")] == [curve["step"].iloc[-1]]
    shutil.copytree(trained_run, out, dirs_exist_ok=True)
    melanoma.main(["--explain", "1", "--name", "tiny", "--out", str(out), "--num-workers", "0",
                   "--log-with", "tensorboard"])
    grid = tensorboard_run(out / "logs" / "tiny_fold0").Images("explain")
    with Image.open(out / "tiny_fold0_explain.png") as im:
        assert [(e.width, e.height) for e in grid] == [im.size]


def test_log_with_a_tracker_that_is_not_installed_is_refused_before_training(tiny_data, tmp_path, capsys):
    import importlib.util
    from accelerate.utils import LoggerType
    absent = [t for t in LoggerType.list()[1:] if importlib.util.find_spec(t) is None]
    if not absent:
        pytest.skip("every tracker accelerate knows is installed")
    refused_run(train_args(tiny_data, tmp_path / "out", "--log-with", "tensorboard", absent[0]), capsys,
                f"--log-with {absent[0]}: not installed", f"pip install {absent[0]}")
    refused_run(train_args(tiny_data, tmp_path / "out", "--log-with", "tensorbored"), capsys, "--log-with",
                "invalid choice: 'tensorbored'")
    assert not (tmp_path / "out").exists()


def test_log_with_all_is_every_installed_tracker_and_refused_if_none(tiny_data, tmp_path, capsys, monkeypatch):
    names = melanoma.tracker_names(melanoma.get_args(["--log-with", "all"]))
    assert "tensorboard" in names and names == [str(t) for t in melanoma.get_available_trackers()]
    assert melanoma.tracker_names(melanoma.get_args([])) is None
    seen = {}
    fake = SimpleNamespace(init_trackers=lambda run, config, kwargs: seen.update(config=config))
    melanoma.start_tracking(fake, "r", values={"a": [1, "b"], "b": None, "c": 2.5})
    assert seen["config"] == {"a": '[1, "b"]', "b": None, "c": 2.5}
    monkeypatch.setattr(melanoma, "get_available_trackers", lambda: [])
    refused_run(train_args(tiny_data, tmp_path / "out", "--log-with", "all"), capsys, "--log-with all",
                "pip install tensorboard")


# ----------------------------------------------------------------------------------------------
# --target diagnosis: the 1st place's classes, P(melanoma) downstream (issue 19)

def test_diagnosis_codes_map_the_competitions_names_and_pass_2019s_codes():
    values = pd.Series(["melanoma", " Nevus", "lentigo NOS", "solar lentigo", "seborrheic keratosis",
                        "lichenoid keratosis", "cafe-au-lait macule", "atypical melanocytic proliferation", "unknown",
                        "bcc", "UNK", "DF"])
    assert melanoma.diagnosis_codes(values, "t").tolist() == ["MEL", "NV", "BKL", "BKL", "BKL", "BKL", "UNK", "UNK",
                                                              "UNK", "BCC", "UNK", "DF"]
    with pytest.raises(melanoma.DataError) as e:
        melanoma.diagnosis_codes(pd.Series(["nevus", "angioma", "wart"]), "train file x.csv")
    assert all(s in str(e.value) for s in ("x.csv: row 3", "'angioma'", "MEL, NV", "UNK", "lentigo NOS"))


@needs_shared
def test_every_real_diagnosis_maps_and_agrees_with_its_target():
    train = pd.read_csv(SHARED / "train.csv", dtype=str, keep_default_na=False)
    ensemble.check_numbers(train, {"target": "0 or 1"}, "train.csv")
    melanoma.check_diagnoses(train, "train.csv")
    assert train["code"].value_counts().to_dict() == {"UNK": 27126, "NV": 5193, "MEL": 584, "BKL": 223}
    assert [c for c in melanoma.DIAGNOSES_2019 if c in set(train["code"])] == ["MEL", "NV", "BKL", "UNK"]


def test_melanoma_logit_is_the_log_odds_of_the_softmax_and_the_loss_follows_the_width():
    torch.manual_seed(0)
    logits = torch.randn(5, 4) * 3
    for mel in range(4):
        p = torch.sigmoid(melanoma.melanoma_logit(logits, ["NV"] * mel + ["MEL"] + ["NV"] * (3 - mel)))
        assert torch.allclose(p, torch.softmax(logits, 1)[:, mel], atol=1e-6)
    two = logits[:, :2]
    assert torch.allclose(melanoma.melanoma_logit(two, ["MEL", "NV"]), two[:, 0] - two[:, 1])  # 2 classes: the binary logit
    assert torch.equal(melanoma.melanoma_logit(logits[:, :1]), logits[:, 0])
    cpu = SimpleNamespace(device=torch.device("cpu"))
    x = torch.zeros(5, 3, 2, 2)
    y = torch.tensor([0, 3, 1, 2, 0])
    loss = melanoma.batch_loss(lambda x: logits, lambda x: x, x, y, cpu)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    yb = torch.tensor([1.0, 0, 0, 1, 0])
    loss = melanoma.batch_loss(lambda x: logits[:, :1], lambda x: x, x, yb, cpu)
    assert loss == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], yb)))


def test_grad_cam_of_several_outputs_explains_the_melanoma_output():
    model = melanoma.ExtrasNet(DarkSpot(), outputs=3)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[4.0], [0.0], [-4.0]]))  # output 0 rises with darkness
        model.head.bias.zero_()
    image = torch.full((1, 3, 64, 64), 230, dtype=torch.uint8)
    image[:, :, 40:56, 8:24] = 20
    augment = melanoma.Augment((0, 0, 0), (1, 1, 1))
    probs, cam = melanoma.grad_cam(model, augment, image, classes=["MEL", "NV", "BKL"])
    peak = divmod(int(cam[0].argmax()), 64)
    assert 40 <= peak[0] < 56 and 8 <= peak[1] < 24
    with torch.no_grad():
        softmax = torch.softmax(model(augment(image, random=False)), 1)
    assert float(probs[0]) == pytest.approx(float(softmax[0, 0]), abs=1e-6)
    probs, cam = melanoma.grad_cam(model, augment, image, classes=["NV", "BKL", "MEL"])  # falls with darkness: nothing for it
    assert float(probs[0]) == pytest.approx(float(softmax[0, 2]), abs=1e-6) and float(cam.max()) == 0


def test_demo_diagnoses_agree_with_targets_and_spread_over_benign_classes(tiny_data):
    train = pd.read_csv(tiny_data / "train.csv")
    assert ((train["diagnosis"] == "melanoma") == (train["target"] == 1)).all()
    benign = train.loc[train["target"] == 0, "diagnosis"]
    assert benign.nunique() >= 4 and set(benign) <= set(melanoma.COMPETITION_DIAGNOSES)
    again = melanoma.demo_diagnoses(train["target"], seed=0)
    assert (again == train["diagnosis"]).all()  # the seed's own stream, not the images'


def test_diagnosis_end_to_end_with_external_meta_mlp_msd_predict_and_explain(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--target", "diagnosis", "--external",
                                              tiny_data / "isic2019", "--meta", "--head", "mlp", "--dropout", "0.2",
                                              "--msd", "2", "--epochs", "1", "--name", "dx")])
    log = capsys.readouterr().out
    info = json.loads((out / "dx_fold0.json").read_text())
    nine = ["MEL", "NV", "BCC", "BKL", "AK", "SCC", "VASC", "DF", "UNK"]
    assert info["classes"] == nine and info["run"]["target"] == "diagnosis" and "classes MEL " in log
    from safetensors.torch import load_file
    assert load_file(out / "dx_fold0.safetensors")["head.3.weight"].shape == (9, 256)
    oof = pd.read_csv(out / "dx_fold0_oof.csv")
    assert oof["pred"].between(0, 1).all() and 0 <= info["oof_auc"] <= 1
    assert "--target diagnosis" in pd.read_csv(out / "runs.csv")["settings"].iloc[-1]
    melanoma.main(["--predict", str(tiny_data / "test.csv"), "--name", "dx", "--out", str(out), "--tta", "2",
                   "--num-workers", "0", "--explain", "1"])
    ours = pd.read_csv(out / "dx_predict.csv")["fold0"].to_numpy()
    assert np.array_equal(ours, pd.read_csv(out / "dx_fold0_test.csv")["target"].to_numpy())  # P(melanoma), exactly
    assert is_png(out / "dx_fold0_explain.png", 100)
    info["classes"] = ["NV", "BKL"]
    (out / "dx_fold0.json").write_text(json.dumps(info))
    refused_run(["--predict", tiny_data / "test.csv", "--name", "dx", "--out", out], capsys, "dx_fold0.json",
                "no melanoma (MEL)")


def test_diagnosis_from_binary_weights_says_the_head_starts_afresh_and_is_another_setting(tiny_data, trained_run,
                                                                                          tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    common = train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--target", "diagnosis")
    melanoma.main([str(a) for a in common + ["--init-from", "tiny", "--name", "dx"]])
    log = capsys.readouterr().out
    assert "tiny_fold0.safetensors: the body loads; head.bias [1] there, [4] here" in log and "start afresh" in log
    assert json.loads((out / "dx_fold0.json").read_text())["classes"] == ["MEL", "NV", "BKL", "UNK"]
    refused_run(common + ["--name", "tiny"], capsys, "tiny_fold0.json", "saved with other settings",
                "--target 'melanoma' (saved) vs 'diagnosis' (now)")


def test_runs_from_before_target_are_read_as_melanoma_runs(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    path = out / "tiny_fold0.json"
    info = json.loads(path.read_text())
    for part in (info["args"], info["run"], info):
        part.pop("target", None)
    info.pop("classes")
    path.write_text(json.dumps(info))
    melanoma.main([str(a) for a in train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "tiny")])
    assert "finished already with these settings" in capsys.readouterr().out
    melanoma.main(["--predict", str(tiny_data / "test.csv"), "--name", "tiny", "--out", str(out), "--tta", "0",
                   "--num-workers", "0"])
    ours = pd.read_csv(out / "tiny_predict.csv")["fold0"].to_numpy()
    assert np.array_equal(ours, pd.read_csv(out / "tiny_fold0_test.csv")["target"].to_numpy())


def test_diagnosis_lr_find_trains_the_class_head(tiny_data, tmp_path, capsys, monkeypatch):
    built = []
    model = melanoma.Extras.model
    monkeypatch.setattr(melanoma.Extras, "model", lambda *a, **kw: built.append(model(*a, **kw)) or built[-1])
    melanoma.main([str(a) for a in train_args(tiny_data, tmp_path, "--lr-find", "--lr-find-steps", "10",
                                              "--lr-find-end", "1e-2", "--name", "dx", "--target", "diagnosis")])
    assert built[0][0].head.out_features == 4 and "lr-find: " in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "dx_lr_find.csv")) == 10


def test_binary_runs_never_read_the_diagnosis(data):
    break_csv(data, "train.csv", lambda df: df.assign(diagnosis="angioma"))
    args = melanoma.get_args(["--data-dir", str(data), "--folds", str(data / "folds.csv")])
    train, _ = melanoma.read_data(args, melanoma.Hooks(args, None), lambda *a: None)
    assert "code" not in train.columns


@pytest.mark.parametrize("breakage, names", [
    (lambda df: df.assign(diagnosis=["nevus", "angioma"] + list(df["diagnosis"][2:])),
     ["train.csv", "row 3", "'angioma'", "MEL, NV", "lentigo NOS"]),
    (lambda df: df.drop(columns="diagnosis"), ["train.csv", "--target diagnosis needs a diagnosis column"]),
    (lambda df: df.assign(target=[0, 0, 1] + list(df["target"][3:]), diagnosis=["nevus"] * 3 + list(df["diagnosis"][3:])),
     ["train.csv", "row 4", "target 1, diagnosis 'nevus'", "disagree"]),
    (lambda df: df.assign(target=[0, 0, 0] + list(df["target"][3:]), diagnosis=["nevus", "nevus", "melanoma"]
                          + list(df["diagnosis"][3:])), ["train.csv", "row 4", "target 0, diagnosis 'melanoma'"]),
])
def test_diagnosis_bad_input_is_one_line_before_training(data, tmp_path, capsys, breakage, names):
    break_csv(data, "train.csv", breakage)
    refused_run(train_args(data, tmp_path / "out", "--target", "diagnosis"), capsys, *names)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# What the hostile review of this change found

def test_meta_init_from_a_meta_run_trains(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = [str(a) for a in train_args(tiny_data, out, "--meta", "--epochs", "1", "--tta", "0")]
    melanoma.main(base + ["--name", "m"])
    melanoma.main(base + ["--name", "mm", "--init-from", "m"])
    assert (out / "mm_fold0.json").is_file() and "another --head" not in capsys.readouterr().out


def test_a_damaged_ledger_is_refused_before_training(tiny_data, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs.csv").write_text(",".join(ensemble.LEDGER) + '\n2026,a,0,0.5,0.5,1,"--size 32,o\n')
    refused_run(train_args(tiny_data, tmp_path / "out"), capsys, "runs.csv", "cannot read it as CSV")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs.csv"]


def test_a_file_where_a_log_folder_goes_is_refused_up_front(tiny_data, tmp_path, capsys):
    (tmp_path / "out" / "logs").mkdir(parents=True)
    (tmp_path / "out" / "logs" / "x_fold1").write_text("")
    refused_run(train_args(tiny_data, tmp_path / "out", "--name", "x", "--fold", "0", "1", "--log-with",
                           "tensorboard"), capsys, "x_fold1", "a file, not a folder")
    assert not list((tmp_path / "out").glob("x_fold0*"))


def test_finished_folds_are_reused_only_whole_and_from_the_same_init_weights(tiny_data, trained_run, tmp_path,
                                                                            capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    args = train_args(tiny_data, out, "--epochs", "1", "--tta", "0", "--name", "b", "--init-from", "tiny")
    melanoma.main([str(a) for a in args])
    from safetensors.torch import load_file, save_file
    weights = load_file(out / "tiny_fold0.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, out / "tiny_fold0.safetensors")
    refused_run(args, capsys, "b_fold0.json", "other --init-from weights")
    save_file(weights, out / "tiny_fold0.safetensors")
    melanoma.main([str(a) for a in args])
    assert "finished already" in capsys.readouterr().out
    (out / "b_fold0_oof.csv").unlink()
    refused_run(args, capsys, "b_fold0_oof.csv", "missing from a finished fold")
    (out / "b_fold0.safetensors").unlink()
    refused_run(["--predict", tiny_data / "test.csv", "--name", "b", "--out", out], capsys, "b_fold0.json",
                "without its weights")


@pytest.mark.parametrize("text, message", [
    ("- name: Hair\n  most: 1000000\n", "bad arguments"),
    ("- name: RandomHorizontalFlip\n  p: .nan\n", "not a finite number"),
    ("- name: Normalize\n  mean: [0, 0, 0]\n  std: [0, 0, 0]\n", "not finite"),
])
def test_augs_that_would_hang_or_make_nan_are_refused_up_front(tiny_data, tmp_path, capsys, text, message):
    (tmp_path / "augs.yaml").write_text(text)
    start = time.time()
    refused_run(train_args(tiny_data, tmp_path / "out", "--augs", tmp_path / "augs.yaml"), capsys, message)
    assert time.time() - start < 30 and not (tmp_path / "out").exists()


def test_lr_find_rates_have_the_training_rates_floor(tiny_data, tmp_path, capsys):
    refused_run(train_args(tiny_data, tmp_path / "out", "--lr-find", "--lr-find-start", "1e-300"), capsys,
                "--lr-find-start: must be at least 1e-12")


def test_runs_refuses_an_infinite_auc(tmp_path, capsys):
    (tmp_path / "runs.csv").write_text(",".join(ensemble.LEDGER) + "\n2026-01-01,a,0,inf,0.5,1,,o\n")
    refused_run(["--runs", tmp_path], capsys, "row 2", "oof_auc must be a finite number or empty, got 'inf'")


def test_predict_reports_broken_links_and_folders_named_like_images(tiny_data, trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run, tmp_path / "out"))
    photos = tmp_path / "photos"
    photos.mkdir()
    smooth_image(64, 48).save(photos / "good.jpg")
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    (photos / "dir.jpg").mkdir()
    refused_run(["--predict", photos, "--name", "tiny", "--out", out, "--tta", "0"], capsys, "3 image(s) cannot be used")
    melanoma.main(["--predict", str(photos), "--name", "tiny", "--out", str(out), "--tta", "0", "--skip-bad",
                   "--num-workers", "0"])
    assert pd.read_csv(out / "tiny_predict.csv")["image_name"].tolist() == ["good.jpg"]
    assert sorted(pd.read_csv(out / "tiny_predict_skipped.tsv", sep="\t")["image_name"]) == ["dir.jpg", "gone.jpg",
                                                                                             "loop.jpg"]


def test_ensemble_runs_without_fcntl_which_only_the_ledger_writer_needs():
    code = ("import sys, runpy; sys.modules['fcntl'] = None; sys.argv = ['ensemble.py', '--help']; "
            "runpy.run_path('ensemble.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert done.returncode == 0 and "Blend prediction files" in done.stdout, done.stderr


def test_demo_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused_run(["--demo", "--data-dir", tmp_path / "f" / "d", "--out", tmp_path / "out"], capsys,
                "--demo --data-dir", "is a file, not a folder")


def test_output_piped_into_a_reader_that_stops_is_no_traceback(tiny_data, trained_run, tmp_path):
    """`--runs | head`: a closed pipe ends the command quietly; ensemble.py writes its files first."""
    write_model(tmp_path, "a", {0: (Y, [.1, .9, .2, .7, .3, .4])}, [0.2, 0.4])
    here = Path(__file__).parent
    for command, cwd in (([here / "melanoma.py", "--runs", trained_run], tmp_path),
                         ([here / "ensemble.py", *A, "--out", "sub.csv"], tmp_path)):
        p = subprocess.Popen([sys.executable, *map(str, command)], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # the reader is gone before the first line
        err = p.stderr.read()
        assert p.wait() in (0, 1) and "Traceback" not in err and "Exception" not in err, err
    assert (tmp_path / "sub.csv").is_file()
