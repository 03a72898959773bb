"""melanoma.py: train, validate and predict SIIM-ISIC 2020 melanoma classifiers in one file.

The recipe of a solo silver medal (top 5 % of 3,300 teams): a patient-grouped CV (folds.csv),
epoch-wise downsampling of the benign class, kornia augmentation on the device, EfficientNet-B5
features + one Linear layer, AdamW (weight decay 0.1) with OneCycle 5e-6 -> 2e-4 over 20 epochs,
15-pass test-time augmentation, then an ensemble of models of different sizes (ensemble.py).

    python melanoma.py --demo                                    # offline demo, seconds on a CPU
    accelerate launch melanoma.py --size 512 --fold 2            # data in data/ (or --data-dir)
    accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 melanoma.py \\
        --data-dir DATA --size 512 --fold 0 1 2 3 4
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 melanoma.py --demo   # two CPU processes
    python melanoma.py --demo --lr-find                          # LR range test: --lr-min/--lr-max
    python melanoma.py --demo --size 96 --init-from demo --name demo96  # from smaller weights
    python melanoma.py --runs; python melanoma.py --help         # the experiments; every flag

Outputs, in --out (default preds/): {name}_fold{k}_oof.csv and _test.csv (predictions), .json
(arguments and figures), .safetensors (weights), _curves.png and _roc.png, and a row per finished
fold in runs.csv; `python ensemble.py preds/*.csv` blends them.

Above the banner `# Beyond the recipe` stands the recipe alone: recipe() trains the folds, and the
file cut there trains them byte for byte as a whole. Below it, the extras attach at the seams of
class Hooks, and main() runs them.

Measured on 2 CPU cores (README.md has the details): the demo trains and predicts fold 0 in about
10 s after a 7 s start (OOF AUC 0.90; 5-fold CV 0.85); a 6000x4000 JPEG loads at 512 px in 0.05 s
against 0.30 s for a plain decode and resize; 15-pass TTA decoding once runs 5.7x faster than
re-reading at 256 px, 2.0x at 512 px. GPU figures: not measured yet.
"""
import argparse, contextlib, json, math, os, sys, time
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from PIL import Image, ImageOps
from safetensors.torch import save as safetensors_bytes
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

# torch-free helpers shared with ensemble.py, which stays free of torch so that it starts at once
from ensemble import DataError, atomic_write_all, read_csv

# Random streams. Every random draw comes from a generator keyed on (seed, STREAM, ...), never
# from a global state, so that each process and a resumed run draw the same numbers, and no two
# uses of randomness share a stream.
NEGATIVES = 1  # benign images an epoch takes: key (seed, NEGATIVES, permutation[, pool > 0])
SHUFFLE = 2    # the order of an epoch's sample: key (seed, SHUFFLE, epoch)
TTA = 3        # the views of prediction: key (seed, TTA, process, batch, view); test set: seed + 1
FRAC = 4       # the --frac subset of the training images: key (seed, FRAC)
INIT = 5       # the model's initial weights (its new head, or all of it without pretraining)
AUGMENT = 6    # the training augmentation: key (seed, AUGMENT, epoch, process)


# ----------------------------------------------------------------------------------------------
# Flags. The groups marked setting=True hold every flag that shapes a fold's outputs.

def recipe_flags(p):
    """The recipe's flags on parser p; main() adds the extras' groups after them."""
    g = flag_group(p, "data", setting=True)
    g.add_argument("--data-dir", type=path, help="competition data: train.csv, test.csv and "
                   "jpeg/train/ (official) or train/ (resized datasets) (default: data/; "
                   "melanoma.py also looks in /kaggle/input/siim-isic-melanoma-classification)")
    g.add_argument("--folds", type=path, help="fold file joined on image_name (default: the "
                   "data folder's folds.csv, else the one beside melanoma.py)")
    g.add_argument("--frac", type=bounded(float, 0, 1, low_open=True), default=1.0,
                   help="fraction of the training images to use (0, 1]")
    g.add_argument("--size", type=bounded(int, 0, 4096, low_open=True), default=512,
                   help="image side in pixels after resizing")
    g = flag_group(p, "sampler", setting=True)
    g.add_argument("--neg-ratio", type=bounded(float, 0, low_open=True), help="benign images per "
                   "melanoma per epoch (default: the fewest that cover all in --epochs epochs)")
    g = flag_group(p, "augmentation", setting=True)
    g.add_argument("--cutout", action="store_true",
                   help="add RandomErasing(p=0.5) to the augmentations")
    g = flag_group(p, "model", setting=True)
    g.add_argument("--model", default="tf_efficientnet_b5.ns_jft_in1k", help="any timm model name")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from timm's pretrained weights (downloaded once)")
    g = flag_group(p, "training", setting=True)
    g.add_argument("--epochs", type=bounded(int, 0, 10**4, low_open=True), default=20,
                   help="epochs of the OneCycle schedule")
    g.add_argument("--batch-size", type=bounded(int, 0, 65536, low_open=True), default=32,
                   help="images per step and process")
    g.add_argument("--lr-min", type=bounded(float, 1e-12, 10), default=5e-6,
                   help="OneCycle starting learning rate")
    g.add_argument("--lr-max", type=bounded(float, 1e-12, 10), default=2e-4,
                   help="OneCycle peak learning rate")
    g.add_argument("--wd", type=bounded(float, 0), default=0.1, help="AdamW weight decay")
    g.add_argument("--seed", type=bounded(int, 0), default=0,
                   help="seed of sampling, augmentation, TTA and init")
    g = flag_group(p, "prediction", setting=True)
    g.add_argument("--tta", type=bounded(int, 0, 1000), default=15,
                   help="augmented passes averaged at prediction; 0: one plain pass")
    g = flag_group(p, "run", setting=False)
    g.add_argument("--fold", type=bounded(int, 0), nargs="+", default=[0],
                   help="validation fold(s) to train")
    g.add_argument("--out", help="output directory (default preds/; --make-folds: folds.csv)")
    g.add_argument("--name", help="run name in output files (default {model}_{size})")
    g.add_argument("--num-workers", type=bounded(int, 0, 64), default=min(8, os.cpu_count() or 1),
                   help="image-loading processes per training process")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="default: what `accelerate launch --mixed_precision` or its config says")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


def flag_group(p, title, setting):
    group = p.add_argument_group(title)
    group.setting = setting
    return group


def path(value):
    """An argparse type: an absolute path, so that a run's JSON serves from any folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a value")
    return str(Path(value).resolve())


def bounded(kind, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite `kind` (int or float) in [low, high], either end open."""
    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {value!r}")
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if number < low or low_open and number == low:
            least = {0: "positive" if low_open else "0 or more"}.get(low, f"at least {low}")
            raise argparse.ArgumentTypeError(f"must be {least}, got {value}")
        if number > high or high_open and number == high:
            raise argparse.ArgumentTypeError(f"must be {'below' if high_open else 'at most'} "
                                             f"{high}, got {value}")
        return number
    return parse


def run_names(args):
    """--out and --name when not given: preds/ and {model}_{size}."""
    args.out = args.out or "preds"
    args.name = args.name or f"{args.model.replace('/', '-')}_{args.size}"
    return args


# ----------------------------------------------------------------------------------------------
# The run: the folds in turn, each trained, validated and predicted; hooks.X: a seam (class Hooks)

def recipe(argv=None):
    """Parse the recipe's flags (argv, else the command line); train, validate, predict folds."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    args = run_names(recipe_flags(p).parse_args(argv))
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    return train_folds(args, accelerator, Hooks(args, accelerator))


def train_folds(args, accelerator, hooks):
    """Train --fold's folds in turn (an extra may keep finished ones), then score their
    concatenated OOF predictions: one AUC, as the competition scores."""
    train, test = hooks.rows(*read_data(args, hooks, accelerator.print))
    results = []
    for fold in args.fold:
        with hooks.fold(fold) as finished:
            results.append(finished or train_fold(args, accelerator, train, test, fold, hooks))
    if len(results) > 1 and accelerator.is_main_process:
        oof = pd.concat([pd.read_csv(fold_file(args, r["fold"], "_oof.csv")) for r in results])
        folds = ", ".join(str(r["fold"]) for r in results)
        print(f"CV AUC over folds {folds}: {roc_auc_score(oof['target'], oof['pred']):.4f} "
              "(one AUC over their concatenated OOF predictions)")
    return results


def read_data(args, hooks, say=print):
    """(training rows with their fold, test rows), each with an image `path`; rows of fold -1 are
    never used. Without --folds: the folds.csv in the data folder, else the one beside this file."""
    args.data_dir = args.data_dir or path("data")
    if args.folds is None:
        beside = Path(args.data_dir) / "folds.csv"
        args.folds = path(str(beside if beside.is_file() else Path(__file__).parent / "folds.csv"))
    dirs = layout_of(args.data_dir)
    if dirs is None:
        raise DataError(f"{args.data_dir}: no competition data found. Looked for train.csv with "
                        "jpeg/train/*.jpg (official layout) or train/*.jpg (resized datasets)")
    train_csv = Path(args.data_dir) / "train.csv"
    train = read_images(train_csv, dirs[0], ["image_name", "target"], "train file", hooks,
                        {"target": "0 or 1"})
    folds = read_csv(args.folds, ["image_name", "fold"], "folds file", {"fold": "a whole number"})
    train = train.drop(columns=["fold"], errors="ignore").merge(
        folds[["image_name", "fold"]], on="image_name", how="left")
    missing = train["fold"].isna()
    if missing.any():
        raise DataError(f"folds file {args.folds}: {missing.sum()} image(s) of {train_csv} "
                        f"missing, e.g. {', '.join(train['image_name'][missing].head(3))}")
    train = train[train["fold"] >= 0].astype({"fold": int}).reset_index(drop=True)
    known = sorted(train["fold"].unique())
    for k in args.fold:
        if k not in known:
            raise DataError(f"--fold {k}: not in {args.folds} "
                            f"(folds there: {', '.join(map(str, known))})")
    test_csv = Path(args.data_dir) / "test.csv"
    if not test_csv.exists():
        say(f"no test.csv in {args.data_dir}: predicting the validation fold only")
        return train, pd.DataFrame(columns=["image_name", "path"])
    return train, read_images(test_csv, dirs[1], ["image_name"], "test file", hooks)


def layout_of(data_dir):
    """(train, test image dirs) of the official layout (jpeg/) or a resized one, or None."""
    d = Path(data_dir)
    for train, test in ((d / "jpeg" / "train", d / "jpeg" / "test"), (d / "train", d / "test")):
        if (d / "train.csv").is_file() and train.is_dir():
            return train, test
    return None


def read_images(path, image_dir, columns, what, hooks, numbers=None):
    """A CSV of images with `columns` (`numbers`: their kinds), each row given its image's path."""
    df = read_csv(path, columns, what, numbers)
    df["path"] = [str(Path(image_dir) / f"{n}.jpg") for n in df["image_name"]]
    return hooks.table(df, what, path)


def train_fold(args, accelerator, train, test, fold, hooks):
    """Train on every fold but `fold`, score it each epoch, then predict it and the test set."""
    start = time.time()
    # data: `fold` validates, the other folds (a --frac share of them) train
    trn, val = split_fold(train, fold, args.frac, args.seed)
    sampler = hooks.sampler(trn)
    train_loader = make_loader(hooks.images(trn), accelerator, args, sampler)
    val_loader = make_loader(hooks.images(val), accelerator, args)
    # the model, what it learns, its augmentation and what trains it
    seed_all(args.seed, INIT)
    raw_model, targets, score = hooks.model(fold, trn)
    raw_model, model, augment, optimizer, scheduler = build_training(
        args, accelerator, raw_model, hooks.augmentations(), len(sampler))
    history = hooks.resume(fold, raw_model, optimizer, scheduler, len(sampler))
    accelerator.print(f"fold {fold}: {len(trn)} training images ({int(trn['target'].sum())} "
                      f"melanomas; {sampler.n} per epoch), {len(val)} validation, {len(test)} "
                      f"test, {accelerator.num_processes} process(es) on {accelerator.device}")
    for epoch in range(len(history), args.epochs):
        # train on the epoch's fresh sample, score the validation fold (one plain pass)
        seed_all(args.seed, AUGMENT, epoch, accelerator.process_index)
        sampler.set_epoch(epoch)
        t0 = time.time()
        loss, images, lr = train_one_epoch(model, augment, train_loader, optimizer, scheduler,
                                           accelerator, targets, epoch, args.epochs)
        train_s = time.time() - t0
        val_pred = predict(model, augment, val_loader, accelerator, 0, args.seed, "validate",
                           score)
        history.append(dict(epoch=epoch + 1, loss=loss, val_auc=roc_auc_score(val["target"],
                            val_pred), lr=lr, images=images, images_per_s=images / train_s,
                            seconds=time.time() - t0))
        h = history[-1]
        accelerator.print(f"fold {fold} epoch {h['epoch']:2d}/{args.epochs}  loss {h['loss']:.4f}  "
                          f"val_auc {h['val_auc']:.4f}  lr {h['lr']:.2e}  "
                          f"{h['images_per_s']:.0f} img/s  {h['seconds']:.0f} s")
        hooks.epoch(fold, history, raw_model, optimizer, scheduler, len(sampler))
    # the last epoch's model predicts with TTA: picking an epoch on the validation fold
    # would inflate the CV
    oof = predict(model, augment, val_loader, accelerator, args.tta, args.seed,
                  f"OOF TTA x{args.tta}", score)
    test_pred = np.zeros(0)
    if len(test):
        test_pred = predict(model, augment, make_loader(hooks.images(test), accelerator, args),
                            accelerator, args.tta, args.seed + 1, f"test TTA x{args.tta}", score)
    result = dict(fold=fold, oof_auc=float(roc_auc_score(val["target"], oof)),
                  oof_auc_no_tta=history[-1]["val_auc"], n_train=len(trn), n_val=len(val),
                  n_test=len(test), wall_s=time.time() - start, epochs=history,
                  augmentations=[str(m) for m in augment.random])
    write_outputs(args, accelerator, fold, trn, val.assign(pred=oof, fold=fold),
                  test.assign(target=test_pred), result, raw_model, hooks)
    hooks.finish(fold, result, len(sampler))
    return result


class Hooks:
    """The recipe's seams: each method is the recipe's own behaviour at one place of the run,
    which an extra may extend or replace by overriding it (main() passes Extras, which does)."""

    def __init__(self, args, accelerator):
        self.args, self.accelerator = args, accelerator

    def table(self, df, what, path):  # each table as read
        return df

    def rows(self, train, test):  # all rows, before the first fold
        return train, test

    def fold(self, fold):  # a context around each fold; it gives a result to keep, or None
        return contextlib.nullcontext()

    def sampler(self, trn):
        a, acc = self.args, self.accelerator
        per_epoch = EpochSampler.per_pool(trn["target"], a.epochs, a.neg_ratio)
        return EpochSampler(trn["target"], a.batch_size, per_epoch, a.seed, acc.process_index,
                            acc.num_processes)

    def images(self, rows):
        return Images(rows["path"], self.args.size)

    def model(self, fold, trn):  # the model, the loss's targets, the melanoma logit of its outputs
        targets = torch.tensor(trn["target"].to_numpy(), dtype=torch.float32)
        return (Net(Net.timm_backbone(self.args.model, self.args.pretrained)), targets,
                lambda output: output[:, 0])

    def augmentations(self):
        return Augment.build(yaml.safe_load(DEFAULT_AUGS))

    def resume(self, fold, raw_model, optimizer, scheduler, steps_per_epoch):
        return []  # the history of the epochs finished already, their state loaded

    def epoch(self, fold, history, raw_model, optimizer, scheduler, steps_per_epoch):
        pass  # after each epoch

    def outputs(self, fold, result, trn, oof):
        pass  # on the main process, after the predictions and weights, before the fold's JSON

    def finish(self, fold, result, steps_per_epoch):
        pass  # after the fold's JSON: the fold is finished


# ----------------------------------------------------------------------------------------------
# Data: rows, loaders, random streams, images; the sampler: every melanoma, fresh benign ones

def split_fold(train, fold, frac, seed):
    """(training rows: a `frac` share of every fold but `fold`; validation rows: `fold`), each
    with both classes: to learn, and for the AUC to exist."""
    trn = train[train["fold"] != fold].reset_index(drop=True)
    if frac < 1:
        keep = rng(seed, FRAC).permutation(len(trn))[:max(1, round(frac * len(trn)))]
        trn = trn.iloc[np.sort(keep)].reset_index(drop=True)
    val = train[train["fold"] == fold].reset_index(drop=True)
    for rows, what in ((trn, "training"), (val, "validation")):
        if rows["target"].nunique() < 2:
            raise DataError(f"--fold {fold}: its {what} images hold only one class "
                            f"({len(rows)} images, {int(rows['target'].sum())} melanomas)")
    return trn, val


def make_loader(dataset, accelerator, args, batch_sampler=None):
    """Training: our batch sampler deals batches to processes. Prediction: accelerate shards a
    plain loader, padding the last batch (gather_for_metrics drops the pad)."""
    kw = dict(num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
              persistent_workers=args.num_workers > 0)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size * 2, **kw)
    return accelerator.prepare(loader)


def rng(*key):
    return np.random.default_rng([abs(int(k)) for k in key])


def seed_all(*key):
    """Seed torch's global generators (CPU and every GPU) from `key`."""
    torch.manual_seed(int(rng(*key).integers(2**62)))


def load_image(path, size):
    """RGB uint8 (size, size, 3), upright as its EXIF says (a phone stores a picture sideways); a
    JPEG is decoded at the smallest DCT scale >= size."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            if im.getexif().get(0x0112, 1) != 1:  # the orientation tag
                im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip it to white
                im = Image.fromarray((np.asarray(im) / 257).clip(0, 255).round().astype(np.uint8))
            return np.array(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path}: cannot decode ({e})")


class Images(torch.utils.data.Dataset):
    """Per row: its uint8 CHW image, the model's further inputs if any (tensors by row: the
    extras' metadata), and its index; augmentation happens later, on the device."""

    def __init__(self, paths, size, load=load_image, inputs=()):
        self.paths, self.size, self.load, self.inputs = list(paths), size, load, inputs

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = torch.from_numpy(self.load(self.paths[i], self.size)).permute(2, 0, 1)
        return image, *(t[i] for t in self.inputs), i


class EpochSampler:
    """Batch sampler over each epoch's sample, cut into global batches of batch_size * world dealt
    to the processes: the same number of steps, disjoint indices that together cover it."""

    def __init__(self, targets, batch_size, per_epoch, seed=0, rank=0, world=1, pools=None):
        self.targets, self.pools, self.per_epoch = np.asarray(targets), pools, per_epoch
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0
        self.n = int(self.targets.sum()) + int(np.sum(per_epoch))  # images per epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.n / (self.batch_size * self.world))

    def __iter__(self):
        idx = self.indices(self.targets, self.per_epoch, self.seed, self.epoch, self.pools)
        for batch in np.array_split(idx, len(self)):
            yield batch[self.rank::self.world].tolist()

    @staticmethod
    def per_pool(targets, epochs, neg_ratio=None):
        """Negatives an epoch takes: neg_ratio per positive, or the fewest that cover them all."""
        n_pos = int(np.sum(targets))
        n_neg = len(targets) - n_pos
        if neg_ratio is None:
            return math.ceil(n_neg / epochs)
        return min(n_neg, max(1, round(min(neg_ratio * n_pos, n_neg))))

    @staticmethod
    def indices(targets, per_epoch, seed, epoch, pools=None):
        """The epoch's sample, shuffled, the same on every process: all positives, and per_epoch
        negatives of each pool of benign images (one, or a count per pool id)."""
        targets = np.asarray(targets)
        pools = np.zeros(len(targets), int) if pools is None else np.asarray(pools)
        chosen = [np.flatnonzero(targets == 1)]
        for pool, count in enumerate(np.atleast_1d(per_epoch)):
            neg = np.flatnonzero((targets == 0) & (pools == pool))
            chosen.append(neg[EpochSampler.negatives(len(neg), int(count), seed, epoch, pool)])
        return rng(seed, SHUFFLE, epoch).permutation(np.concatenate(chosen))

    @staticmethod
    def negatives(n_neg, per_epoch, seed, epoch, pool=0):
        """Positions into a pool's benign images for `epoch`: a stream of permutations (each drawn
        once before any again), an epoch straddling two getting no image twice."""
        if per_epoch == 0:
            return np.zeros(0, int)
        start, stop = epoch * per_epoch, (epoch + 1) * per_epoch
        prev, chunks = None, []
        for c in range((stop + n_neg - 1) // n_neg):
            perm = rng(seed, NEGATIVES, c, *([pool] if pool else [])).permutation(n_neg)
            lo = c * n_neg
            epoch_start = (lo // per_epoch) * per_epoch  # of the epoch that straddles lo, if any
            if prev is not None and epoch_start < lo:
                # that epoch's draws from the previous permutation go to the end of this one
                tail = prev[epoch_start - (lo - n_neg):]
                perm = np.concatenate([perm[~np.isin(perm, tail)], perm[np.isin(perm, tail)]])
            if max(start, lo) < min(stop, lo + n_neg):
                chunks.append(perm[max(start, lo) - lo:min(stop, lo + n_neg) - lo])
            prev = perm
        return np.concatenate(chunks)


# ----------------------------------------------------------------------------------------------
# Model and training: the augmentation on the device, Net, AdamW and OneCycle

def build_training(args, accelerator, raw_model, stack, steps_per_epoch):
    """On the device, AdamW on every parameter and OneCycle over all epochs. `raw_model`'s weights
    are saved and loaded; `model`, the same as accelerate (and torch.compile) wrapped it, runs."""
    raw_model, augment = on_device(raw_model, args.cutout, stack, accelerator)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr_max, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr_max, div_factor=args.lr_max / args.lr_min,
        total_steps=args.epochs * steps_per_epoch)
    model = torch.compile(raw_model) if args.compile else raw_model
    model, optimizer = accelerator.prepare(model, optimizer)
    return raw_model, model, augment, optimizer, scheduler


def on_device(raw_model, cutout, stack, accelerator):
    """The model and its augmentation (normalised as its backbone was trained) on the device."""
    cfg = raw_model.backbone.pretrained_cfg
    augment = Augment(cfg["mean"], cfg["std"], cutout, stack)
    return (raw_model.to(accelerator.device, memory_format=torch.channels_last),
            augment.to(accelerator.device))


# The recipe's random stack, in the form --augs reads: kornia.augmentation class names and
# their arguments, applied in this order to float [0, 1] images before normalising.
DEFAULT_AUGS = """\
- name: RandomAffine
  degrees: 180
  translate: [0.02, 0.02]
- name: RandomHorizontalFlip
  p: 0.5
- name: ColorJitter
  brightness: 0.1
  contrast: [0.7, 1.3]
  saturation: [0.8, 1.2]
"""


class Augment(torch.nn.Module):
    """uint8 NCHW batch -> normalised float, channels-last: a random stack (the recipe's: affine,
    flip, colour jitter), then optional cutout; random=False gives the plain view."""

    def __init__(self, mean, std, cutout=False, stack=None):
        super().__init__()
        stack = self.build(yaml.safe_load(DEFAULT_AUGS)) if stack is None else stack
        self.random = K.AugmentationSequential(*stack)
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))
        # erased patches are filled with 0 after normalising: the mean colour, not black
        self.cutout = K.RandomErasing(p=0.5, scale=(0.02, 0.1), ratio=(0.3, 3.3)) if cutout \
            else None

    @staticmethod
    def build(entries, own=None):
        """The modules of [{name: class, **arguments}] entries, kornia.augmentation's classes or
        own's ({name: class}); YAML has no tuples, and kornia's ranges are tuples."""
        return [((own or {}).get(e["name"]) or getattr(K, e["name"]))(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in e.items() if k != "name"})
            for e in entries]

    def forward(self, x, random=True):
        x = x.float().div_(255)
        if random:
            x = self.random(x)
        x = self.normalize(x)
        if random and self.cutout is not None:
            x = self.cutout(x)
        return x.contiguous(memory_format=torch.channels_last)


class Net(torch.nn.Module):
    """A timm backbone's pooled features and one Linear layer: the melanoma logit. (Not timm's
    own classifier through num_classes=1: it starts from other weights, another number.)"""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.num_features, 1)

    def forward(self, x):
        return self.head(self.backbone(x))

    @staticmethod
    def timm_backbone(name, pretrained=True):
        """timm's model `name` without its classifier, pretrained (downloaded once) or fresh."""
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DataError(f"--model {name}: not a timm model{hint}")
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0)
        except OSError as e:  # only a download fails so: offline, or no weights on the hub
            if not pretrained:
                raise
            raise DataError(f"--model {name}: could not get pretrained weights ("
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline, pass "
                            "--weights FILE, or --no-pretrained to train from scratch")


def train_one_epoch(model, augment, loader, optimizer, scheduler, accelerator, targets, epoch,
                    epochs):
    """(mean loss and image count over all processes, the last step's learning rate)."""
    model.train()
    loss_sum, seen = 0.0, 0
    # a progress bar on a terminal; none in a log file, where the one line per epoch says it
    bar = tqdm(loader, f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    for step, (x, *inputs, idx) in enumerate(bar):
        lr = scheduler.get_last_lr()[0]
        loss_value, stepped = train_step(model, augment, x, targets[idx], optimizer, scheduler,
                                         accelerator, inputs)
        if not stepped:
            where = "" if not math.isfinite(loss_value) else " on another process"
            raise FloatingPointError(f"loss is {loss_value if not where else 'not finite'}"
                                     f"{where} at epoch {epoch + 1}, step {step + 1}")
        accelerator.log({"train/loss": loss_value}, step=epoch * len(loader) + step)
        loss_sum += loss_value * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    total = accelerator.reduce(torch.tensor([loss_sum, seen], device=accelerator.device), "sum")
    loss_sum, seen = total.tolist()
    return loss_sum / seen, int(seen), lr


def train_step(model, augment, x, y, optimizer, scheduler, accelerator, inputs=()):
    """(the batch's loss before the step, whether it stepped). No process steps when one's loss is
    not finite: the others would wait in the gradients' all-reduce for one that never comes."""
    loss = batch_loss(model, augment, x, y, accelerator, inputs)
    loss_value = loss.item()  # a CPU-GPU sync point: it catches a bad step at once
    finite = math.isfinite(loss_value)
    if accelerator.num_processes > 1:
        bad = torch.tensor(float(not finite), device=accelerator.device)
        finite = accelerator.reduce(bad, "sum").item() == 0
    if finite:
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_value, finite


def batch_loss(model, augment, x, y, accelerator, inputs=()):
    """A batch's loss, augmented on the device: binary cross-entropy on one logit (y: float
    targets), cross-entropy over several (y: class indices)."""
    x = x.to(accelerator.device, non_blocking=True)
    y = y.to(accelerator.device, non_blocking=True)
    inputs = [t.to(accelerator.device, non_blocking=True) for t in inputs]
    output = model(augment(x), *inputs).float()
    if output.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(output.squeeze(1), y)
    return F.cross_entropy(output, y)


# ----------------------------------------------------------------------------------------------
# Prediction with TTA, and the outputs

def predict(model, augment, loader, accelerator, tta, seed, desc, score):
    """P(melanoma) for every row of loader's dataset, each exactly once, on every process."""
    model.eval()
    rows, probs = [], []
    with torch.no_grad():
        for b, (x, *inputs, idx) in enumerate(tqdm(loader, desc, leave=False, disable=not (
                accelerator.is_main_process and sys.stderr.isatty()))):
            p = predict_batch(model, augment, x, tta, (seed, TTA, accelerator.process_index, b),
                              inputs, score)
            idx, p = accelerator.gather_for_metrics((idx, p))
            rows.append(idx.cpu())
            probs.append(p.cpu())
    n = len(loader.dataset)
    rows = torch.cat(rows).numpy() if rows else np.zeros(0, int)
    counts = np.bincount(rows, minlength=n)
    if (counts != 1).any():
        raise RuntimeError(f"{desc}: {(counts == 0).sum()} rows unscored, "
                           f"{(counts > 1).sum()} scored twice")
    out = np.empty(n)
    out[rows] = torch.cat(probs).numpy() if probs else []
    return out


def predict_batch(model, augment, x, tta, key, inputs=(), score=lambda output: output[:, 0]):
    """P(melanoma) per image, the sigmoid of score(the outputs) (the recipe's: its one logit), of
    one plain pass (tta=0) or the mean of `tta` augmented views of the same decoded batch."""
    if tta == 0:
        return torch.sigmoid(score(model(augment(x, random=False), *inputs).float()))
    total = 0
    for view in range(tta):
        with seeded(*key, view):
            total = total + torch.sigmoid(score(model(augment(x), *inputs).float()))
    return total / tta


@contextlib.contextmanager
def seeded(*key):
    """Draw from a generator keyed on `key` without touching the global random state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        seed_all(*key)
        yield


def write_outputs(args, accelerator, fold, trn, oof, test, result, raw_model, hooks):
    """Predictions and weights (all or none), the extras' outputs, then the JSON: a fold is
    finished when its JSON exists. All written through Python: a full disk is an OSError."""
    result.update(processes=accelerator.num_processes, device=str(accelerator.device),
                  mixed_precision=accelerator.mixed_precision, args=vars(args))
    if accelerator.is_main_process:
        fold_file(args, fold, ".json").unlink(missing_ok=True)  # unfinished while outputs change
        weights = safetensors_bytes({k: v.contiguous() for k, v in raw_model.state_dict().items()})
        files = {fold_file(args, fold, "_oof.csv"): lambda tmp: oof[
                     ["image_name", "target", "pred", "fold"]].to_csv(tmp, index=False),
                 fold_file(args, fold, ".safetensors"): lambda tmp: Path(tmp).write_bytes(weights)}
        if len(test):
            files[fold_file(args, fold, "_test.csv")] = lambda tmp: test[
                ["image_name", "target"]].to_csv(tmp, index=False)
        atomic_write_all(files)
        hooks.outputs(fold, result, trn, oof)
        text = json.dumps(result, indent=1, default=str, allow_nan=False)
        atomic_write_all({fold_file(args, fold, ".json"): lambda tmp: Path(tmp).write_text(text)})
    accelerator.wait_for_everyone()
    accelerator.print(f"fold {fold}: OOF AUC {result['oof_auc']:.4f} with TTA x{args.tta}, "
                      f"{result['oof_auc_no_tta']:.4f} without; {result['wall_s']:.0f} s")


def fold_file(args, fold, suffix):
    """A fold's output: {out}/{name}_fold{k}{suffix}."""
    return Path(args.out) / f"{args.name}_fold{fold}{suffix}"


# ==============================================================================================
# Beyond the recipe
# ==============================================================================================
# The extras attach at the recipe's seams, the methods of class Hooks: table (each table as
# read), rows (all rows, before the first fold), fold (around each fold), sampler, images, model
# and augmentations (the fold's parts), resume and epoch (its state), outputs (before the JSON
# that finishes a fold) and finish (after it). Class Extras overrides them, in that order, by
# calling the sections below; each section's flags are a group of get_parser; main() runs it all.

import copy, difflib, functools, glob, hashlib, io, itertools, pickle, re, resource, shlex, signal
import tempfile, warnings
from types import SimpleNamespace

from accelerate import __version__ as ACCELERATE_VERSION
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, gather_object
from matplotlib.figure import Figure
from safetensors.torch import load as safetensors_load
from sklearn.metrics import roc_curve

from ensemble import LEDGER_FILE, ArgumentParser, append_run, atomic_write, check_names, \
    check_numbers, check_writable, finite, print_runs, read_ledger, refuse_rows, text


# ----------------------------------------------------------------------------------------------
# Flags of the extras, and the run's checks: flags when parsed, the device and the output
# folders before any data is read

# Where the data is looked for without --data-dir: here, then where Kaggle notebooks mount it.
DATA_LOCATIONS = ("data", "/kaggle/input/siim-isic-melanoma-classification")
# --demo: these flags come first, so that the command line can override any of them
DEMO = ("--data-dir demo_data --model test_efficientnet --no-pretrained --size 64 --epochs 12 "
        "--batch-size 32 --lr-max 2e-3 --tta 4 --num-workers 0 --name demo")


def get_args(argv=None):
    p = get_parser()
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    demo = shlex.split(DEMO) if "--demo" in argv else []
    args = p.parse_args(demo + argv)
    check_flags(p, args)
    args.settings = settings(args, p.parse_args(demo))
    args.out = args.out or ("folds.csv" if args.make_folds else None)
    return run_names(args)


@functools.cache
def get_parser():
    """The recipe's flags, then a group for each extra."""
    p = recipe_flags(ArgumentParser(description=__doc__.splitlines()[0],
                                    formatter_class=HelpFormatter, allow_abbrev=False))
    g = flag_group(p, "metadata and heads", setting=True)
    g.add_argument("--meta", action="store_true", help="add the patient metadata (sex, age, site, "
                   "the patient's image count, image size) to the image features")
    g.add_argument("--head", choices=["linear", "mlp"], default="linear",
                   help="one Linear layer (the recipe), or Linear-SiLU-Dropout-Linear")
    g.add_argument("--dropout", type=bounded(float, 0, 1, high_open=True), default=0.0,
                   help="dropout before the head, [0, 1)")
    g.add_argument("--msd", type=bounded(int, 1, 32), default=1,
                   help="multi-sample dropout: the head averaged over this many dropout masks")
    g = flag_group(p, "external data and the diagnosis target", setting=True)
    g.add_argument("--external", metavar="DIR", type=path, action="append", help="ISIC 2019 data "
                   "(train.csv with diagnosis; train/*.jpg) that only trains; repeatable")
    g.add_argument("--external-neg-ratio", type=bounded(float, 0, low_open=True), help="benign "
                   "external images per external melanoma per epoch (default: one pool)")
    g.add_argument("--target", choices=["melanoma", "diagnosis"], default="melanoma",
                   help="what the head learns: melanoma (one logit, the recipe) or diagnosis (the "
                   "1st place's classes, a softmax); either way every score is P(melanoma)")
    g = flag_group(p, "starting weights", setting=True)
    g.add_argument("--weights", type=path, help="weights to start from (.safetensors, state dict)")
    g.add_argument("--init-from", metavar="RUN", type=text, help="start each fold from the same "
                   "fold's weights of an earlier run: a run name in --out, or a path prefix "
                   "(other/preds/NAME), read as {RUN}_fold{k}.safetensors")
    g = flag_group(p, "augmentation files and hair", setting=True)
    g.add_argument("--augs", metavar="FILE", type=path, help="YAML list of kornia.augmentation "
                   "classes and arguments replacing the recipe's stack (DEFAULT_AUGS)")
    g.add_argument("--hair", type=bounded(float, 0, 1), default=0.0, metavar="P",
                   help="draw dark hairs over an image with probability P (appends Hair(p=P))")
    g = flag_group(p, "cache", setting=True)
    g.add_argument("--cache", type=text, help="directory for images resized to --size (written "
                   "once, reused; re-encoded, so the pixels differ slightly)"
                   ).key = lambda folder: True  # other pixels: on or off counts, not where
    g = flag_group(p, "resume, trackers and the demo", setting=False)
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last epoch")
    g.add_argument("--overwrite", action="store_true",
                   help="retrain folds that already have outputs")
    g.add_argument("--log-with", nargs="+", choices=LoggerType.list(), metavar="NAME",
                   help=f"trackers ({', '.join(LoggerType.list())}; all: every one installed) of "
                   "training, --lr-find and --explain, a run per fold; TensorBoard's in {out}/logs")
    g.add_argument("--demo", action="store_true", help="make a small synthetic dataset once and "
                   f"train on it with CPU-sized defaults: {DEMO}")
    g = flag_group(p, "tools (one at a time; --explain also goes with --predict)", setting=False)
    g.add_argument("--make-folds", metavar="TRAIN_CSV", type=path,
                   help="write patient-grouped folds of TRAIN_CSV to --out")
    g.add_argument("--n-folds", type=bounded(int, 2, 100), default=5,
                   help="number of folds for --make-folds")
    g.add_argument("--benchmark", action="store_true",
                   help="measure loading, augmentation, step and TTA speed")
    g.add_argument("--lr-find", action="store_true", help="LR range test on the first --fold: "
                   "writes {name}_lr_find.csv and .png in --out, prints --lr-min and --lr-max")
    g.add_argument("--lr-find-start", type=bounded(float, 1e-12), default=1e-7,
                   metavar="LR", help="--lr-find's first learning rate")
    g.add_argument("--lr-find-end", type=bounded(float, 1e-12, 1e9), default=1.0,
                   metavar="LR", help="--lr-find's last learning rate (rising exponentially)")
    g.add_argument("--lr-find-steps", type=bounded(int, 10, 10**5), default=200, metavar="N",
                   help="--lr-find's steps from start to end, unless the loss diverges first")
    g.add_argument("--lr-find-batches", type=bounded(int, 1, 64), default=1, metavar="N",
                   help="--lr-find's batches per step, their mean loss at the same weights: the "
                   "noise / sqrt(N)")
    g.add_argument("--runs", nargs="?", type=text, const="preds", metavar="OUT",
                   help="print the experiments of OUT/runs.csv (default OUT: preds), best first")
    g.add_argument("--predict", metavar="PATH", type=path, help="score a folder of images or a "
                   "CSV with image_name with every fold of run --name in --out")
    g.add_argument("--skip-bad", action="store_true", help="with --predict: leave out unreadable "
                   "images (listed in {name}_predict_skipped.tsv) instead of stopping")
    g.add_argument("--explain", type=bounded(int, 1, 32), metavar="N", help="Grad-CAM grids of "
                   "run --name: each fold's N worst OOF mistakes (and N top new images)")
    # the flags of the setting groups: resume, finished folds, the ledger and the model record
    p.settings = [a for g in p._action_groups if getattr(g, "setting", False)
                  for a in g._group_actions]
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or there is none."""

    def _get_help_string(self, action):
        if "default" in action.help or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def check_flags(p, args):
    """The checks that each flag's type cannot make: a text value (empty, from an unset shell
    variable, or undecodable), --name, and the flags that relate to each other."""
    for a in p._actions:
        value = getattr(args, a.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                try:
                    text(v)
                except argparse.ArgumentTypeError as e:
                    p.error(f"argument {'/'.join(a.option_strings)}: {e}")
    tools = [f"--{t.replace('_', '-')}" for t in TOOLS if getattr(args, t)]
    name = args.name or ""
    for wrong, message in (
            (set(name) & set("/\\\0\n\r") or name.startswith((".", "-")) or len(name) > 150
             or name != name.strip(), "argument --name: must be a plain file-name part of at most "
             f"150 characters on one line, not starting with '.' or '-', got {name[:160]!r}"),
            (args.lr_min > args.lr_max, f"need --lr-min <= --lr-max, got --lr-min {args.lr_min} "
             f"--lr-max {args.lr_max}"),
            (args.external_neg_ratio is not None and not args.external,
             "--external-neg-ratio needs --external"),
            (args.msd > 1 and args.dropout == 0,
             "--msd averages over dropout masks: it needs --dropout above 0"),
            (args.resume and args.overwrite,
             "--resume continues a checkpoint and --overwrite discards it: pass one"),
            (len(set(args.fold)) < len(args.fold),
             f"--fold lists a fold twice: {' '.join(map(str, args.fold))}"),
            (args.skip_bad and not args.predict, "--skip-bad goes with --predict"),
            (args.weights and args.init_from,
             "--weights and --init-from both set the starting weights: pass one"),
            (args.lr_find_start >= args.lr_find_end, "need --lr-find-start < --lr-find-end, got "
             f"{args.lr_find_start} and {args.lr_find_end}"),
            (len(tools) > 1 and tools != ["--predict", "--explain"],
             f"{' and '.join(tools[:2])} are two tools: pass one")):
        if wrong:
            p.error(message)


def settings(args, defaults):
    """The setting flags that differ from their defaults (--demo's with --demo), as the ledger
    shows them: a command-line fragment as given, before the data location is filled in."""
    parts = ["--demo"] if args.demo else []
    for a in get_parser().settings:
        value, flag = getattr(args, a.dest), a.option_strings[0]
        if value == getattr(defaults, a.dest):
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            parts.append(a.option_strings[0 if value else 1])
        elif value is True:
            parts.append(flag)
        elif isinstance(value, list) and a.nargs is None:  # a repeatable flag
            parts += [token for v in value for token in (flag, str(v))]
        else:
            parts += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(parts)


def check_run(args, accelerator):
    """Before any data is read: the precision the device can run, the output folders, and the
    demo's data, which the main process makes once, before the others read it."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise DataError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    with accelerator.main_process_first():
        if args.demo and not (Path(args.data_dir) / "train.csv").exists():
            make_demo_data(args.data_dir, seed=args.seed)
    if args.data_dir is None:  # the first default location that holds a competition layout
        found = [d for d in DATA_LOCATIONS if layout_of(d)]
        if not found:
            raise DataError(f"no competition data found in {' or '.join(DATA_LOCATIONS)}: "
                            "download it with `kaggle competitions download -c siim-isic-melanoma-"
                            "classification` and unzip it into data/ (train.csv with jpeg/train/ "
                            "or train/), pass --data-dir DIR, or run --demo, which needs no data")
        args.data_dir = path(found[0])
        accelerator.print(f"data: {found[0]} (the first default location that holds a "
                          "competition layout; --data-dir chooses another)")
    check_writable(args.out, "--out")
    if args.cache:
        check_writable(args.cache, "--cache")


def one_line(e):
    """An error's one line: in a loader process, its traceback's last."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if lines[0].startswith(("Caught DataError", "Traceback")):
        return lines[-1].split("DataError: ")[-1]
    return " ".join(line.strip() for line in lines)


# ----------------------------------------------------------------------------------------------
# The extras at the recipe's seams

class Extras(Hooks):
    """The recipe's seams with the extras attached, in the order a run meets them. What the run
    learns on the way is taken once, when read, and recorded as it was used. A fold's checkpoint
    lives here: checked before any fold trains, loaded, saved each epoch, removed at its end."""

    def __init__(self, args, accelerator):
        super().__init__(args, accelerator)
        self.names = set()    # train.csv's image names: external data drops its copies of them
        self.key = None       # the run's settings (resume, finished folds, the JSON, the ledger)
        self.finished = {}    # {fold: result} of the folds an earlier run finished, kept
        self.spec = self.classes = None  # the metadata encoding, the classes the head learns
        self.entries = yaml.safe_load(DEFAULT_AUGS)  # the augmentations (--augs, --hair)
        self.init = {}        # {fold: its --init-from weights' key}, taken as they were loaded

    def table(self, df, what, path):
        args, where = self.args, f"{what} {path}"
        if what == "train file":
            self.names = set(df["image_name"])
            if args.target == "diagnosis":
                check_diagnoses(df, where)
        return meta_columns(df, where) if args.meta else df

    def rows(self, train, test):
        args, accelerator = self.args, self.accelerator
        train = train.assign(external=False)
        if args.external:
            train = add_external(train, self)
        for fold in args.fold:  # each requested fold can train and validate, before any trains
            split_fold(train, fold, args.frac, args.seed)
        if args.target == "diagnosis":  # every fold's head the same: all the training rows' classes
            self.classes = [c for c in DIAGNOSES_2019 if c in set(train["code"])]
        if args.augs or args.hair:
            self.entries = aug_entries(args)
            check_augs(self.entries, args)
        if args.init_from:
            check_init_from(args)
        if not args.lr_find:  # the range test writes no fold
            self.key = run_key(args, accelerator)  # the settings as the inputs were read
            self.check_outputs()
        if set(args.fold) - set(self.finished):  # all finished: no image will be read
            check_images(list(train["path"]) + ([] if args.lr_find else list(test["path"])),
                         accelerator)
        if args.meta:
            self.spec = fit_meta(train, test)
            train, test = with_meta(train, self.spec), with_meta(test, self.spec)
        return train, test

    def check_outputs(self):
        """Before any fold trains: the ledger must take a row; one --name is one model; a finished
        fold (its JSON exists) is kept, whole, only if it had the same settings and starting
        weights; a checkpoint needs --resume (same settings) or --overwrite."""
        args, ledger = self.args, Path(self.args.out) / LEDGER_FILE
        if ledger.exists() and not ledger.is_file():  # a pipe would hang the append
            raise DataError(f"{ledger}: a {'folder' if ledger.is_dir() else 'pipe or device'} "
                            "where an output file goes (the ledger)")
        if ledger.is_symlink() and not ledger.exists():
            raise DataError(f"{ledger}: a link to nowhere (or to itself): cannot append a row")
        if ledger.exists():  # a fold whose row cannot be written would count as finished
            try:
                open(ledger, "a").close()
            except OSError as e:
                raise DataError(f"{ledger}: cannot append to the ledger ({e.strerror or e})")
            if ledger.stat().st_size:
                read_ledger(ledger)  # a damaged ledger would take the row into its damage
        for fold, stem in run_folds(args.out, args.name).items():
            json_file = stem.with_suffix(".json")
            if fold in args.fold or not json_file.is_file():
                continue  # a requested fold is reused only with the same settings, or retrained
            changed = differences(read_saved(json_file)["run"], self.key)
            if changed:
                raise DataError(f"--name {args.name}: fold {fold} ({json_file.name}) was trained "
                                f"with other settings ({'; '.join(changed)}); one --name is one "
                                "model: give this run its own --name")
        for fold in args.fold:
            check_output_files(fold_file(args, fold, suffix) for suffix in FOLD_OUTPUTS)
            done, ckpt = fold_file(args, fold, ".json"), fold_file(args, fold, "_last.pt")
            if done.exists() and not args.overwrite:
                self.finished[fold] = read_saved(done, self.key)
                for suffix in (".safetensors", "_oof.csv"):
                    if not fold_file(args, fold, suffix).is_file():
                        raise DataError(f"{fold_file(args, fold, suffix)}: missing from a finished "
                                        "fold (its JSON is there); --overwrite retrains the fold")
                if args.init_from:
                    init = content_key(init_file(args, fold))
                    if self.finished[fold].get("init", init) != init:
                        raise DataError(f"{done}: this fold finished from other --init-from "
                                        f"weights ({init_file(args, fold).name} changed since): "
                                        "give the new run its own --name, or --overwrite")
            elif ckpt.exists() and not (args.resume or args.overwrite):
                raise DataError(f"{ckpt}: an unfinished run is there: pass --resume to continue "
                                "it or --overwrite to start over")
            elif ckpt.exists() and args.resume:
                read_saved(ckpt, self.key, CHECKPOINT)
            elif args.resume:
                self.accelerator.print(f"fold {fold}: --resume found no checkpoint ({ckpt}): "
                                       "starting from scratch")

    @contextlib.contextmanager
    def fold(self, fold):
        """A finished fold is kept; an error in training names the fold and its checkpoint."""
        args = self.args
        if fold in self.finished:
            self.accelerator.print(f"fold {fold}: finished already with these settings "
                                   f"({fold_file(args, fold, '.json').name}); --overwrite "
                                   "retrains it")
            yield self.finished[fold]
            return
        try:
            yield None
        except (DataError, FloatingPointError) as e:
            ckpt = fold_file(args, fold, "_last.pt")
            kept = f", last good checkpoint kept ({ckpt}; --resume continues from it)" \
                if ckpt.exists() else ""
            hint = "" if not isinstance(e, FloatingPointError) else (
                f" (lower --lr-max {args.lr_max:g}, or check the augmentation: "
                f"{args.augs or 'the recipe stack'}{', --hair' if args.hair else ''}"
                f"{', --cutout' if args.cutout else ''})")
            raise type(e)(f"fold {fold}: {one_line(e)}{hint}; the fold is not finished{kept}") \
                from None

    def sampler(self, trn):
        """With --external-neg-ratio two pools of benign images, each with its ratio."""
        args, acc = self.args, self.accelerator
        if args.external_neg_ratio is None:
            return super().sampler(trn)
        pools = trn["external"].to_numpy().astype(int)
        per_epoch = [EpochSampler.per_pool(trn["target"][pools == pool], args.epochs, ratio)
                     for pool, ratio in enumerate((args.neg_ratio, args.external_neg_ratio))]
        return EpochSampler(trn["target"], args.batch_size, per_epoch, args.seed,
                            acc.process_index, acc.num_processes, pools)

    def images(self, rows):
        args = self.args
        load = functools.partial(cached_load, cache=args.cache) if args.cache else load_image
        return Images(rows["path"], args.size, load, meta_inputs(rows) if args.meta else ())

    def model(self, fold, trn):
        args = self.args
        start = init_file(args, fold) if args.init_from else args.weights
        raw_model = ExtrasNet(Net.timm_backbone(args.model, args.pretrained and not start),
                              **ExtrasNet.shape(args, self.spec, self.classes))
        if args.init_from or args.weights:
            flag = "--init-from" if args.init_from else "--weights"
            weights, key = read_weights(start, flag)
            load_weights(raw_model, weights, f"{flag} {start}", args.model, self.accelerator.print)
            self.init[fold] = key if args.init_from else None
        if args.target == "diagnosis":
            counts = trn["code"].value_counts()  # a class without an image is only pushed down
            absent = [c for c in self.classes if not counts.get(c)]
            self.accelerator.print(f"fold {fold}: classes " + ", ".join(
                f"{c} {counts.get(c, 0)}" for c in self.classes) + (
                f" ({', '.join(absent)}: no image here, only pushed down)" if absent else ""))
            targets = torch.tensor(trn["code"].map(self.classes.index).to_numpy())
            return raw_model, targets, functools.partial(melanoma_logit, classes=self.classes)
        return raw_model, torch.tensor(trn["target"].to_numpy(), dtype=torch.float32), \
            lambda output: output[:, 0]

    def augmentations(self):
        return Augment.build(self.entries, OWN_AUGS)

    def resume(self, fold, raw_model, optimizer, scheduler, steps_per_epoch):
        """With --resume, the checkpoint's epochs, their state loaded; with --overwrite it goes:
        after an error, the old state must not look resumable."""
        args, accelerator = self.args, self.accelerator
        ckpt, history = fold_file(args, fold, "_last.pt"), []
        if ckpt.exists() and args.overwrite and accelerator.is_main_process:
            ckpt.unlink(missing_ok=True)
        elif ckpt.exists() and not args.overwrite:
            state = read_saved(ckpt, self.key, CHECKPOINT)
            try:
                raw_model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise DataError(f"{ckpt}: does not fit this model ({one_line(e)[:160]}); delete "
                                "it or pass --overwrite")
            if accelerator.scaler is not None and "scaler" in state:
                accelerator.scaler.load_state_dict(state["scaler"])
            history = state["history"]
            accelerator.print(f"{ckpt.name}: resuming after epoch {len(history)}")
        if accelerator.log_with:
            start_tracking(accelerator, f"{args.name}_fold{fold}", len(history) * steps_per_epoch,
                           dict(self.key, name=args.name, fold=fold))
        return history

    def epoch(self, fold, history, raw_model, optimizer, scheduler, steps_per_epoch):
        """The state after the epoch, one file written whole (not accelerate's save_state: a
        folder of files, which a kill leaves half new; and our draws need no random state)."""
        args, accelerator = self.args, self.accelerator
        if accelerator.log_with:  # at the epoch's last step, before a resumed fold's first
            h = history[-1]
            accelerator.log({"train/epoch_loss": h["loss"], "train/lr": h["lr"], "val/auc":
                             h["val_auc"], "train/images_per_s": h["images_per_s"]},
                            step=h["epoch"] * steps_per_epoch - 1)
        if accelerator.is_main_process:
            state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), history=history, run=self.key)
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()  # fp16's loss scale
            buffer = io.BytesIO()
            torch.save(state, buffer)  # in memory: torch's own file writer hides a full disk
            atomic_write(fold_file(args, fold, "_last.pt"),
                         lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))
        accelerator.wait_for_everyone()

    def outputs(self, fold, result, trn, oof):
        args = self.args
        result.update(n_external=int(trn["external"].sum()), meta=self.spec, classes=self.classes,
                      init=self.init.get(fold), augs=self.entries, run=self.key)
        plot_fold(args, fold, result, oof)
        append_run(Path(args.out) / LEDGER_FILE, dict(
            date=time.strftime("%Y-%m-%d %H:%M:%S"), name=args.name, fold=fold,
            oof_auc=result["oof_auc"], oof_auc_no_tta=result["oof_auc_no_tta"],
            wall_s=round(result["wall_s"], 1), settings=args.settings, out=args.out))

    def finish(self, fold, result, steps_per_epoch):
        args, accelerator = self.args, self.accelerator
        if accelerator.is_main_process:
            fold_file(args, fold, "_last.pt").unlink(missing_ok=True)
        if accelerator.log_with:
            step = args.epochs * steps_per_epoch - 1
            accelerator.log({"oof/auc": result["oof_auc"],
                             "oof/auc_no_tta": result["oof_auc_no_tta"]}, step=step)
            end_tracking(accelerator, {"curves": fold_file(args, fold, "_curves.png"),
                                       "roc": fold_file(args, fold, "_roc.png")}, step)


# ----------------------------------------------------------------------------------------------
# Resume and finished folds: what shaped a fold, derived from the flags of the setting groups

def run_key(args, accelerator):
    """Everything that shaped a fold's outputs: each setting flag (a path by its content, a flag
    with a key by that), the mixed precision and the number of processes (the global batch)."""
    key = {}
    for a in get_parser().settings:
        value, count = getattr(args, a.dest), getattr(a, "key", content_key if a.type is path
                                                      else None)
        if count and value is not None:
            value = [count(v) for v in value] if isinstance(value, list) else count(value)
        key[a.dest] = value
    return dict(key, mixed_precision=accelerator.mixed_precision,
                processes=accelerator.num_processes)


DIGESTS = {}  # content_key's SHA-256s by (path, size, mtime): an edited file is read again


def content_key(p):
    """A path counts by its content (by its path an edited file would pass for the same), a data
    folder by its tables' (None if missing: a copy is the same); a missing path by itself."""
    if os.path.isdir(p):
        return [content_key(Path(p) / f"{t}.csv") if (Path(p) / f"{t}.csv").exists() else None
                for t in ("train", "test")]
    if not os.path.isfile(p):
        return str(p)
    stamp = (str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
    if stamp not in DIGESTS:
        with open(p, "rb") as f:
            DIGESTS[stamp] = f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"
    return DIGESTS[stamp]


def run_folds(out, name):
    """{fold: {out}/{name}_fold{k}} for every fold of run `name` with a JSON or weights there."""
    pattern = re.compile(rf"^{re.escape(name)}_fold(\d+)\.(json|safetensors)$")
    found = (pattern.match(p.name) for p in Path(out).glob(f"{glob.escape(name)}_fold*"))
    return {int(m[1]): Path(out) / f"{name}_fold{m[1]}" for m in sorted(
        filter(None, found), key=lambda m: int(m[1]))}


# What a fold saves: its JSON (a finished fold) and its checkpoint (an unfinished one), each with
# the fields it must hold and how it is read (the checkpoint without unpickling code)
RESULT = ("a finished fold's JSON", ("args", "run"), lambda f: json.loads(Path(f).read_text()))
CHECKPOINT = ("a checkpoint", ("model", "optimizer", "scheduler", "history", "run"),
              lambda f: torch.load(f, map_location="cpu", weights_only=True))


def read_saved(file, key=None, kind=RESULT):
    """A fold's JSON or checkpoint (kind), saved with the settings `key` (None: any)."""
    what, fields, load = kind
    try:
        saved = load(file)
        if not (isinstance(saved, dict) and set(fields) <= set(saved)
                and isinstance(saved["run"], dict) and isinstance(saved.get("args", {}), dict)):
            raise TypeError(f"not melanoma.py's: it needs {', '.join(fields)}")
        if saved.get("classes") is not None and "MEL" not in saved["classes"]:
            raise ValueError("its classes have no melanoma (MEL)")
    except Exception as e:  # cut short, of another kind, or objects that would run code
        raise DataError(f"{file}: {what} that cannot be read ({one_line(e)[:160]}); move it "
                        "away, or --overwrite to retrain the fold")
    changed = differences(saved["run"], key) if key is not None else []
    if changed:
        raise DataError(f"{file}: {what} saved with other settings ({'; '.join(changed)}): give "
                        "the new run its own --name, or --overwrite to retrain the fold")
    return saved


def differences(saved, key, labels=("saved", "now")):
    """The settings of `key` that `saved` holds otherwise, as '--flag old (saved) vs new (now)'.
    One that `saved` lacks (a run older than its flag) counts as the flag's default."""
    defaults = {a.dest: a.default for a in get_parser().settings}
    old = {k: saved.get(k, defaults.get(k)) for k in key}
    return [f"--{k.replace('_', '-')} {old[k]!r} ({labels[0]}) vs {v!r} ({labels[1]})"
            for k, v in key.items() if old[k] != v]


# What a fold writes in --out, after {name}_fold{k}
FOLD_OUTPUTS = ("_oof.csv", "_test.csv", ".json", ".safetensors", "_last.pt", "_curves.png",
                "_roc.png")


def check_output_files(paths):
    for p in paths:
        if Path(p).is_dir():
            raise DataError(f"{p}: a folder where an output file goes")


# ----------------------------------------------------------------------------------------------
# Image checks: every image before the first epoch

def check_images(paths, accelerator=None, skip_bad=False, hint=""):
    """{path: why} of the images that cannot be used, all named before training, each process
    checking a share; they stop the run (`hint` ends the error) unless --predict's --skip-bad."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    bad = {}
    for path in tqdm(paths[rank::world], "checking images", leave=False,
                     disable=not (rank == 0 and len(paths) >= 2000 and sys.stderr.isatty())):
        why = image_fault(path)
        if why:
            bad[path] = f"image {path}: {why}"
    if world > 1:
        found = {p: why for share in gather_object([bad]) for p, why in share.items()}
        bad = {p: found[p] for p in paths if p in found}
    if bad and not skip_bad or len(bad) == len(paths):
        raise DataError(f"{len(bad)} image(s) cannot be used (of {len(paths)}), e.g. "
                        f"{'; '.join(list(bad.values())[:3])}{hint}")
    return bad


def image_fault(path):
    """Why an image cannot be used (missing, empty, implausibly large: a decompression bomb, cut
    short), or None; cheap for a JPEG (its header and its end), whole for a PNG (one stream)."""
    if os.path.isdir(path):
        return "a folder, not an image"
    kind = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # a camera's multi-picture JPEG (MPO) is a JPEG with more images after the first
                (width, height), kind = im.size, {"MPO": "JPEG"}.get(im.format, im.format)
                if kind == "PNG":
                    im.load()
    except FileNotFoundError as e:
        return e.strerror
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"more than {Image.MAX_IMAGE_PIXELS} pixels: refused, a possible decompression bomb"
    except (OSError, SyntaxError, ValueError) as e:
        try:
            with open(path, "rb") as f:
                head = f.read(3)
        except OSError as unreadable:  # a broken or looping link, a file without read access
            return unreadable.strerror or str(unreadable)
        return ("empty file" if not head else f"not a complete {kind} ({e})" if kind else
                "not a complete JPEG (truncated)" if head == b"\xff\xd8\xff" else
                f"not an image ({e})")
    if path.lower().endswith((".jpg", ".jpeg")) and kind != "JPEG":
        return f"not a JPEG but {kind} (no JPEG header)"
    if width * height > Image.MAX_IMAGE_PIXELS or min(width, height) < 1:
        return f"{width}x{height} pixels, refused as implausible (at most {Image.MAX_IMAGE_PIXELS})"
    if kind != "JPEG":
        return None
    # a JPEG's scans hold no end marker (their 0xFF bytes are followed by 0 or a restart), so one
    # after the first scan's start is the image's end; the segment headers' lengths lead there
    # past an embedded thumbnail, whose own end marker would pass a cut-short file
    with open(path, "rb") as f:
        pos, start = 2, None
        while start is None:
            f.seek(pos)
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF:
                break
            start = pos if head[1] == 0xDA else None
            pos += 2 + int.from_bytes(head[2:4], "big") if head[1] != 0xFF else 1
        size = f.seek(0, os.SEEK_END)
        for begin in (max(start, size - 1024), start) if start is not None else ():
            f.seek(begin)  # the last kilobyte first, then all from the scan on
            if b"\xff\xd9" in f.read():
                return None
    return "not a complete JPEG (truncated)"


# ----------------------------------------------------------------------------------------------
# Metadata and heads: --meta, --head, --dropout, --msd, and the model that takes them

# The columns --meta reads from train.csv, test.csv and external data.
META_COLUMNS = ["patient_id", "sex", "age_approx", "anatom_site_general_challenge"]
# The spellings of sex that --meta takes (any case), as one category each; "" is missing.
SEXES = {"male": "male", "m": "male", "female": "female", "f": "female", "": "", "unknown": ""}


def meta_columns(df, where):
    """A table's metadata as --meta reads it: its columns checked, sex as one spelling, and each
    row's patient's image count in this table."""
    missing = [c for c in META_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where}: --meta needs column(s) {', '.join(missing)}")
    check_names(df, where, "patient_id", unique=False)
    check_numbers(df, {c: "a finite number or empty" for c in ("age_approx", "width", "height")},
                  where)
    sex = df["sex"].str.strip().str.lower()
    refuse_rows(where, ~sex.isin(list(SEXES)), df["sex"], "--meta: sex {value!r} is none of male, "
                "female (m, f, in any case) or unknown (or empty)")
    df["sex"] = sex.map(SEXES)
    df["patient_images"] = df.groupby("patient_id")["image_name"].transform("size")
    return df


def fit_meta(train, test):
    """The metadata encoding saved with the run: categories of both tables, scaling from the
    training rows' (not ColumnTransformer's: its std divides by n, not n - 1: other numbers)."""
    tables = [t for t in (train, test) if len(t)]
    size = "pixels" if all({"width", "height"} <= set(t.columns) for t in tables) else "bytes"
    spec = dict(size=size)
    for column, key in (("sex", "sexes"), ("anatom_site_general_challenge", "sites")):
        values = pd.concat([t[column] for t in tables]).dropna().astype(str)
        spec[key] = sorted(set(values.str.strip()) - {""})
    raw = meta_raw(train, spec)
    for column in ("age", "log_patient_images", "log_size"):
        mean, std = raw[column].mean(), raw[column].std()
        # a column with no value (or one) is all missing or constant: its indicator says it all
        spec[column] = [float(mean) if np.isfinite(mean) else 0.0,
                        float(std) if np.isfinite(std) and std > 0 else 1.0]
    return spec


def meta_raw(df, spec):
    """The numeric metadata before scaling: age (NaN when missing), the log of the patient's
    image count, and the log of the original image size (pixels, or the file's bytes)."""
    if spec["size"] == "pixels":
        size = pd.to_numeric(df["width"], errors="coerce") * pd.to_numeric(df["height"],
                                                                           errors="coerce")
    else:
        size = pd.Series([os.path.getsize(p) for p in df["path"]], index=df.index)
    return pd.DataFrame(dict(age=pd.to_numeric(df["age_approx"], errors="coerce"),
                             log_patient_images=np.log(df["patient_images"].astype(float)),
                             log_size=np.log(size.astype(float).clip(lower=1))))


def with_meta(df, spec):
    """df with its metadata features as columns meta_0, meta_1, ..."""
    features = meta_features(df, spec)
    names = [f"meta_{i}" for i in range(features.shape[1])]
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(features, columns=names)], axis=1)


def meta_features(df, spec):
    """Metadata as float32 features: sex and site one-hot with a missing category; age scaled,
    with a missing indicator; the patient's image count and the image size, log-scaled."""
    raw, columns = meta_raw(df, spec), []
    for column, key in (("sex", "sexes"), ("anatom_site_general_challenge", "sites")):
        values = df[column].fillna("").astype(str).str.strip()
        columns += [values == v for v in spec[key]]
        columns.append(~values.isin(spec[key]))
    for column in ("age", "log_patient_images", "log_size"):
        mean, std = spec[column]
        scaled = (raw[column] - mean) / std
        columns.append(scaled.fillna(0).clip(-5, 5))
        if column != "log_patient_images":
            columns.append(raw[column].isna())
    return np.column_stack([np.asarray(c, np.float32) for c in columns])


def meta_inputs(rows):
    """The rows' metadata features (their meta_* columns) as the model's further input."""
    columns = [c for c in rows.columns if str(c).startswith("meta_")]
    return [torch.tensor(rows[columns].to_numpy(np.float32))]


class ExtrasNet(torch.nn.Module):
    """The recipe's Net with the extras: the pooled features, and the metadata MLP's, through
    dropout into the head, one Linear layer (Net's weights and names) or a small MLP, `outputs`
    logits; multi-sample dropout (msd > 1) averages the head over that many masks in training
    (not timm's drop_rate: one dropout, one mask)."""

    def __init__(self, backbone, n_meta=0, head="linear", dropout=0.0, msd=1, outputs=1):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.meta = None
        if n_meta:  # LayerNorm, not BatchNorm: a process's last batch may hold a single image
            self.meta = torch.nn.Sequential(
                torch.nn.Linear(n_meta, 128), torch.nn.LayerNorm(128), torch.nn.SiLU(),
                torch.nn.Dropout(0.3), torch.nn.Linear(128, 32), torch.nn.LayerNorm(32),
                torch.nn.SiLU(), torch.nn.Dropout(0.3))
            width += 32
        self.dropout = torch.nn.Dropout(dropout)
        if head == "linear":
            self.head = torch.nn.Linear(width, outputs)
        else:
            self.head = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.SiLU(),
                                            torch.nn.Dropout(dropout),
                                            torch.nn.Linear(256, outputs))
        self.msd = msd

    @staticmethod
    def shape(args, spec, classes):
        """The one record of the model's shape, from the flags, the metadata encoding (its features:
        sex and site one-hot with a missing category each, age and size with a missing indicator
        each, the patient's image count) and the classes (None: one logit)."""
        return dict(n_meta=len(spec["sexes"]) + len(spec["sites"]) + 7 if spec else 0,
                    head=args.head, dropout=args.dropout, msd=args.msd,
                    outputs=len(classes) if classes else 1)

    def forward(self, x, meta=None):
        return self.logit(self.backbone.forward_features(x), meta)

    def logit(self, feature_map, meta=None):
        """The logits from the backbone's last feature map, where Grad-CAM looks."""
        features = self.backbone.forward_head(feature_map, pre_logits=True)
        if self.meta is not None:
            features = torch.cat([features, self.meta(meta)], dim=1)
        if not self.training or self.msd == 1:
            return self.head(self.dropout(features))
        return torch.stack([self.head(self.dropout(features)) for _ in range(self.msd)]).mean(0)


# ----------------------------------------------------------------------------------------------
# External data and the diagnosis target (the 1st place's classes, scored by P(melanoma))

# ISIC 2019's diagnoses, the classes of --target diagnosis in this order; only MEL is a melanoma.
DIAGNOSES_2019 = ("MEL", "NV", "BCC", "BKL", "AK", "SCC", "VASC", "DF", "UNK")
# The competition's diagnoses as ISIC 2019's classes, as the 1st place merged them.
COMPETITION_DIAGNOSES = {
    "melanoma": "MEL", "nevus": "NV", "seborrheic keratosis": "BKL", "lichenoid keratosis": "BKL",
    "solar lentigo": "BKL", "lentigo NOS": "BKL", "unknown": "UNK", "cafe-au-lait macule": "UNK",
    "atypical melanocytic proliferation": "UNK"}


def add_external(train, hooks):
    """The training rows and each --external folder's (ISIC 2019 in a competition layout) with
    fold -1, which only trains, less those among train.csv's (ISIC 2019 holds some of 2020's)."""
    for folder in hooks.args.external:
        dirs = layout_of(folder)
        if dirs is None:
            raise DataError(f"--external {folder}: no train.csv with train/ (or jpeg/train/) there")
        csv = Path(folder) / "train.csv"
        extra = read_images(csv, dirs[0], ["image_name", "diagnosis"], "external file", hooks)
        extra["code"] = diagnosis_codes(extra["diagnosis"], f"external file {csv}")
        extra = extra.assign(target=(extra["code"] == "MEL").astype(int), fold=-1, external=True)
        seen = extra["image_name"].isin(hooks.names)
        hooks.names |= set(extra["image_name"])
        melanomas = int(extra["target"][~seen].sum())
        hooks.accelerator.print(f"--external {folder}: {int((~seen).sum())} images ({melanomas} "
                                f"melanomas) for training only; {int(seen.sum())} dropped, "
                                "already among the training images")
        train = pd.concat([train, extra[~seen]], ignore_index=True)
    return train


def diagnosis_codes(values, where):
    """ISIC 2019's class of each diagnosis, in any case: the competition's names mapped
    (COMPETITION_DIAGNOSES), 2019's codes as they are. Another value is refused by its row."""
    words = values.astype(str).str.strip()
    names = {name.lower(): code for name, code in COMPETITION_DIAGNOSES.items()}
    codes = words.str.lower().map(names).fillna(words.str.upper())
    refuse_rows(where, ~codes.isin(DIAGNOSES_2019), values,
                f"diagnosis {{value!r}} is none of ISIC 2019's {', '.join(DIAGNOSES_2019)} nor "
                f"the competition's {', '.join(COMPETITION_DIAGNOSES)}")
    return codes


def check_diagnoses(train, where):
    """--target diagnosis: each competition row's class (column `code`) from its diagnosis,
    which must agree with its target: 1 for a melanoma, 0 for anything else."""
    if "diagnosis" not in train.columns:
        raise DataError(f"{where}: --target diagnosis needs a diagnosis column; there is none")
    train["code"] = diagnosis_codes(train["diagnosis"], where)
    said = "target " + train["target"].astype(str) + ", diagnosis " + train["diagnosis"].map(repr)
    refuse_rows(where, (train["code"] == "MEL") != (train["target"] == 1), said,
                "{value}: they disagree (a melanoma has target 1, any other diagnosis 0)")


def melanoma_logit(output, classes=None):
    """predict's score: the log-odds of melanoma per image, the one logit, or over several outputs
    (`classes`) the melanoma class's less the logsumexp of the others'."""
    output, melanoma = output.float(), classes.index("MEL") if classes else 0
    if output.shape[1] == 1:
        return output.squeeze(1)
    others = torch.cat([output[:, :melanoma], output[:, melanoma + 1:]], 1)
    return output[:, melanoma] - torch.logsumexp(others, 1)


# ----------------------------------------------------------------------------------------------
# Starting weights: --weights, --init-from

def read_weights(file, flag="--weights"):
    """(a state dict, the key of the file as it was loaded) from .safetensors or a torch file of
    tensors only (a pickle could run code); not timm's load_state_dict: it reads the file apart."""
    if not Path(file).is_file():
        raise DataError(f"{flag} {file}: "
                        f"{'a folder, not a file' if Path(file).is_dir() else 'no such file'}")
    data = Path(file).read_bytes()
    try:
        if str(file).endswith(".safetensors"):
            sd = safetensors_load(data)
        else:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(f"{flag} {file}: refused, it holds pickled objects, not only tensors "
                        f"({str(e).splitlines()[0][:160]}); save a state_dict or .safetensors")
    except Exception as e:  # safetensors' and torch's own errors for a file of another kind
        raise DataError(f"{flag} {file}: not a weights file ({one_line(e)[:160]})")
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not (isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values())):
        raise DataError(f"{flag} {file}: holds no state dict (names -> tensors)")
    return sd, f"sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def load_weights(model, sd, what, name, say=print):
    """Load what fits: every backbone tensor must; a head or metadata MLP of another shape
    (another --head, --target or --meta) starts afresh, as one line through `say` tells."""
    if not any(k.startswith("backbone.") for k in sd):  # a bare timm model's state dict
        classifier = model.backbone.default_cfg.get("classifier", "~") + "."
        sd = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith(classifier)}
    own = model.state_dict()
    resized = {k for k in sd if k in own and sd[k].shape != own[k].shape}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in sd.items() if k not in resized}, strict=False)
    lost = [k for k in list(missing) + sorted(resized) if k.startswith("backbone.")]
    foreign = [k for k in unexpected if k.startswith("backbone.")]
    if foreign or lost:
        raise DataError(f"{what}: does not fit --model {name} "
                        f"(missing {lost[:3]}, unexpected {foreign[:3]})")
    afresh = [f"{k} {list(sd[k].shape)} there, {list(own[k].shape)} here" for k in sorted(resized)]
    afresh += [f"{k} there only" for k in unexpected if not k.startswith("backbone.")]
    if afresh:
        say(f"{what}: the body loads; {', '.join(afresh[:4])}{', ...' if len(afresh) > 4 else ''}"
            ": its head is another (another --head, --target or --meta), so the head's layers "
            "start afresh")


def init_file(args, fold):
    """--init-from's weights for `fold` (a plain run name is one in --out): the same fold's,
    whose validation images that run never trained on, unlike another fold's."""
    prefix = Path(args.out) / args.init_from if Path(args.init_from).name == args.init_from \
        else Path(args.init_from)
    return prefix.parent / f"{prefix.name}_fold{fold}.safetensors"


def check_init_from(args):
    """Every requested fold's --init-from weights must fit, before the first fold trains."""
    model = Net(Net.timm_backbone(args.model, False))
    for fold in args.fold:
        file = init_file(args, fold)
        if not file.is_file():
            raise DataError(f"--init-from {args.init_from}: no {file} (fold {fold}'s weights; a "
                            "plain run name is looked for in --out)")
        load_weights(model, read_weights(file, "--init-from")[0], f"--init-from {file}",
                     args.model, say=lambda line: None)  # the head is said when the fold trains


# ----------------------------------------------------------------------------------------------
# Hair and --augs

class Hair(torch.nn.Module):
    """Hairs over a float [0, 1] NCHW batch: with probability p an image gets 1 to `most` thin,
    dark, curved strands (quadratic Bezier curves across the lesion), drawn from torch's global
    generator like kornia's augmentations: the per-epoch seeding keeps runs reproducible."""

    def __init__(self, p=0.5, most=6, width=(0.002, 0.005), segments=12):
        super().__init__()
        if not 0 <= p <= 1 or not 1 <= int(most) <= 64 or not 0 < width[0] <= width[1] <= 0.5:
            raise ValueError("need 0 <= p <= 1, 1 <= most <= 64, 0 < width <= 0.5, got "
                             f"{p}, {most}, {width}")
        self.p, self.most, self.segments = float(p), int(most), int(segments)
        self.width = tuple(map(float, width))  # half the strand's thickness, share of the side

    def extra_repr(self):
        return f"p={self.p}, most={self.most}, width={self.width}"

    def forward(self, x):
        if self.p == 0:
            return x
        n, _, h, w = x.shape
        side, dev = max(h, w), x.device
        # every draw is made for every image and strand, so the stream does not depend on p
        hairy = torch.rand(n, 1, device=dev) < self.p
        count = torch.randint(1, self.most + 1, (n, 1), device=dev)
        middle = (0.2 + 0.6 * torch.rand(n, self.most, 2, device=dev)) * torch.tensor(
            [h, w], device=dev)  # strands cross the centre, where the lesion is
        angle = torch.rand(n, self.most, device=dev) * 2 * math.pi
        length = (0.3 + 0.6 * torch.rand(n, self.most, device=dev)) * side
        bend = (torch.rand(n, self.most, device=dev) - 0.5) * 0.6
        lo, hi = self.width
        half = (lo + (hi - lo) * torch.rand(n, self.most, device=dev)) * side
        shade = 0.05 + 0.2 * torch.rand(n, 1, 1, 1, device=dev)  # one dark brown per image
        colour = shade * torch.tensor([1.0, 0.75, 0.55], device=dev)[:, None, None]
        # only the strands drawn are rendered: (K, ...) for the K strands of the hairy images
        on = hairy & (torch.arange(self.most, device=dev) < count)
        way = torch.stack([torch.sin(angle[on]), torch.cos(angle[on])], -1) * length[on, None]
        normal = torch.stack([way[:, 1], -way[:, 0]], -1)
        start, end = middle[on] - way / 2, middle[on] + way / 2
        control = middle[on] + bend[on, None] * normal
        t = torch.linspace(0, 1, self.segments + 1, device=dev)[:, None, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end  # (T + 1, K, 2)
        yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=x.dtype),
                                torch.arange(w, device=dev, dtype=x.dtype), indexing="ij")
        dist = torch.full((len(start), h, w), math.inf, device=dev, dtype=x.dtype)
        for a, b in zip(curve[:-1], curve[1:]):  # each pixel's distance to the segments a -> b
            ay, ax, by, bx = (v[:, None, None] for v in (a[:, 0], a[:, 1], b[:, 0], b[:, 1]))
            dy, dx = by - ay, bx - ax
            t = ((yy - ay) * dy + (xx - ax) * dx) / (dy * dy + dx * dx).clamp_min(1e-12)
            t = t.clamp(0, 1)
            dist = torch.minimum(dist, torch.hypot(yy - ay - t * dy, xx - ax - t * dx))
        # anti-aliased: full cover within the half width, fading out over one pixel
        cover = torch.zeros(n, self.most, h, w, device=dev, dtype=x.dtype)
        cover[on] = (half[on][:, None, None] + 0.5 - dist).clamp(0, 1)
        cover = cover.amax(1, keepdim=True)
        return x * (1 - cover) + colour * cover


# Our own augmentations, usable in an --augs file beside kornia's.
OWN_AUGS = {"Hair": Hair}


def aug_entries(args):
    """The random stack as entries, read once: --augs or the recipe's, then Hair with --hair."""
    entries = read_augs(args.augs) if args.augs else yaml.safe_load(DEFAULT_AUGS)
    return entries + [dict(name="Hair", p=args.hair)] if args.hair else entries


def read_augs(file, most_bytes=65536, most_entries=100):
    """The entries of an --augs YAML file, a short list, without YAML's aliases: a few nested (a
    "billion laughs") expand to more than the memory holds."""
    if Path(file).is_dir():
        raise DataError(f"--augs {file}: a folder, not a YAML file")
    try:
        with open(file, "rb") as f:
            content = f.read(most_bytes + 1).decode()
    except FileNotFoundError:
        raise DataError(f"--augs {file}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--augs {file}: cannot read it ({one_line(e)})")
    if len(content) > most_bytes:
        raise DataError(f"--augs {file}: larger than {most_bytes} bytes; a stack is a few lines")
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(content)):
            raise DataError(f"--augs {file}: YAML aliases (*name) are not taken; write it out")
        entries = yaml.safe_load(content)
    except yaml.YAMLError as e:
        raise DataError(f"--augs {file}: not YAML ({one_line(e)[:200]})")
    if not isinstance(entries, list) or len(entries) > most_entries:
        got = f"a list of {len(entries)}" if isinstance(entries, list) else type(entries).__name__
        raise DataError(f"--augs {file}: not a list of at most {most_entries} augmentations "
                        f"(- name: RandomAffine ...), but {got}")
    return entries


def check_augs(entries, args):
    """Each entry names a 2D augmentation (kornia's or OWN_AUGS'), probabilities in [0, 1], and
    is built and run on a batch of --size images: it must keep the shape and make finite values."""
    where = f"--augs {args.augs}" if args.augs else "augmentation"
    known = [n for n in dir(K) if isinstance(getattr(K, n), type)
             and issubclass(getattr(K, n), K.AugmentationBase2D)] + list(OWN_AUGS)
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{where}: entry {i}: needs a name (- name: RandomAffine): {entry!r}")
        where_i = f"{where}: entry {i} ({entry['name']})"
        if finite(entry) != entry:
            raise DataError(f"{where_i}: an argument is not a finite number")
        if entry["name"] not in known:
            close = difflib.get_close_matches(entry["name"], known, 3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DataError(f"{where_i}: not a 2D augmentation of kornia.augmentation, nor one "
                            f"of {', '.join(OWN_AUGS)}{hint}")
        for k in ("p", "p_batch"):
            if k in entry and not (isinstance(entry[k], (int, float)) and 0 <= entry[k] <= 1):
                raise DataError(f"{where_i}: {k} {entry[k]} is a probability: it must be in [0, 1]")
        try:
            module, = Augment.build([entry], OWN_AUGS)
        except Exception as e:  # kornia's own errors for arguments it does not take
            raise DataError(f"{where_i}: bad arguments {entry}: {one_line(e)[:200]}")
        with seeded(0):
            x = torch.rand(2, 3, args.size, args.size)
            try:
                y = module(x)
            except Exception as e:  # arguments kornia takes but cannot apply
                raise DataError(f"{where_i} fails on a batch of {args.size} px images: "
                                f"{one_line(e)[:200]}")
        if not torch.is_tensor(y) or y.shape != x.shape:
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise DataError(f"{where_i} must keep the shape, not make {tuple(x.shape)} {shape}")
        if not torch.isfinite(y).all():
            raise DataError(f"{where_i} makes values that are not finite (NaN or infinite)")


# ----------------------------------------------------------------------------------------------
# The cache: images resized once

def cached_load(file, size, cache):
    """load_image through a cache of quality-95 JPEGs keyed on the source's path, size and
    mtime; an entry that does not decode (damaged, or replaced) is made again."""
    try:
        st = os.stat(file)
    except OSError as e:
        raise DataError(f"image {file}: {e.strerror}")
    key = hashlib.sha1(f"{os.path.abspath(file)}|{st.st_size}|{st.st_mtime_ns}|{size}".encode())
    hit = Path(cache) / f"{Path(file).stem}_{size}_{key.hexdigest()[:16]}.jpg"
    if hit.is_file():
        with contextlib.suppress(DataError):  # damaged (or another file in its place): made again
            return load_image(hit, size)  # at its size already: as decoded, not resized
    image = Image.fromarray(load_image(file, size))
    atomic_write(hit, lambda tmp: image.save(tmp, "JPEG", quality=95))
    return load_image(hit, size)


# ----------------------------------------------------------------------------------------------
# Plots

def plot_fold(args, fold, result, oof):
    """{name}_fold{k}_curves.png: training loss and validation AUC per epoch, the learning rate
    below; {name}_fold{k}_roc.png: the OOF predictions' ROC curve, its AUC in the legend."""
    stem, history, tta = f"{args.name}_fold{fold}", result["epochs"], result["args"]["tta"]
    epochs = [h["epoch"] for h in history]
    curves = Figure(figsize=(7, 5.5), layout="constrained")
    top, bottom = curves.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    lines = top.plot(epochs, [h["loss"] for h in history], "o-", color="C0", label="training loss")
    auc = top.twinx()
    lines += auc.plot(epochs, [h["val_auc"] for h in history], "s-", color="C1",
                      label="validation AUC, plain pass")
    lines += auc.plot(epochs[-1:], [result["oof_auc"]], "*", ms=14, color="C3",
                      label=f"OOF AUC with TTA x{tta}: {result['oof_auc']:.4f}")
    loss = f"cross-entropy, {len(result['classes'])} classes" if result.get("classes") else "BCE"
    top.set_ylabel(f"training loss ({loss})")
    auc.set_ylabel("AUC")
    top.legend(handles=lines, loc="lower center", bbox_to_anchor=(0.5, 1), ncols=3, fontsize=8,
               frameon=False)
    curves.suptitle(f"{stem}: {result['n_train']} training images, {result['n_val']} validation",
                    fontsize=10)
    bottom.plot(epochs, [h["lr"] for h in history], "o-", color="C2")
    bottom.set(ylabel="learning rate\n(last step)", xlabel="epoch")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    fpr, tpr, _ = roc_curve(oof["target"], oof["pred"])
    roc = Figure(figsize=(5, 5), layout="constrained")
    ax = roc.subplots()
    ax.plot(fpr, tpr, color="C0", lw=2, label=f"OOF, TTA x{tta}: AUC {result['oof_auc']:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="chance: AUC 0.5")
    ax.set(aspect="equal", xlabel="false positive rate (benign lesions flagged)",
           ylabel="true positive rate (melanomas found)")
    ax.legend(loc="lower right")
    ax.set_title(f"{stem}: {len(oof)} images, {int(oof['target'].sum())} melanomas", fontsize=10)
    # both or none; a bare Figure draws with Agg: no pyplot, no display
    atomic_write_all({fold_file(args, fold, f"_{kind}.png"): functools.partial(
        fig.savefig, format="png", dpi=100) for kind, fig in (("curves", curves), ("roc", roc))})


def plot_lr_find(curve, reading, title, loss="BCE"):
    """Loss against learning rate (log axis): the steps, the smoothed loss and its noise band, the
    class mix's entropy, and each rule's pick (read_lr_curve's reading)."""
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve["lr"], curve["loss"], color="0.7", lw=0.8, label="loss per step")
    ax.fill_between(curve["lr"], curve["band_low"], curve["band_high"], color="C0", alpha=0.25,
                    lw=0, label=f"noise band: ±{LR_BAND} standard errors")
    ax.plot(curve["lr"], curve["smoothed"], color="C0", lw=2, label="smoothed loss")
    if reading["entropy"] is not None:
        ax.axhline(reading["entropy"], color="0.3", ls=":",
                   label=f"class mix's entropy {reading['entropy']:.3f}")
    if reading["lr_max"] is not None:
        ax.axvspan(*reading["fall"], color="C2", alpha=0.1, label="the fall")
        ax.axvline(reading["lr_max"], color="C3", ls="--",
                   label=f"valley rule, halfway down: --lr-max {reading['lr_max']:.1e}")
    ax.plot([reading["lowest_lr"]], [reading["lowest"]], "o", color="C0", ms=8,
            label=f"lowest smoothed loss, at {reading['lowest_lr']:.1e}")
    ax.axvline(reading["second_lr"], color="C1", ls="-.",
               label=f"a tenth of it (second rule): {reading['second_lr']:.1e}")
    # scaled to the smoothed loss and its band: the noise of single batches would flatten it
    low, high = curve["band_low"].min(), curve["smoothed"].max()
    ax.set(xscale="log", ylim=(low - 0.2 * (high - low), high + 0.2 * (high - low)),
           xlabel="learning rate (log scale)", ylabel=f"training loss ({loss})")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# Trackers: --log-with, through accelerate (init_trackers, log), on the main process only

# How the trackers whose log_images we feed take a batch of images; the others take none.
IMAGE_KWARGS = {"tensorboard": {"dataformats": "NHWC"}, "wandb": {}}


def tracker_names(args):
    """--log-with as accelerate's log_with, checked before training: accelerate drops a tracker
    that is not installed with no more than a debug line, and a log folder that cannot be
    written would end the run when its tracker opens."""
    if not args.log_with:
        return None
    installed = [str(t) for t in get_available_trackers()]
    if "all" in args.log_with and not installed:
        raise DataError("--log-with all: none of accelerate's trackers is installed: "
                        "pip install tensorboard (offline: tensorboard --logdir OUT/logs)")
    for name in args.log_with:
        if name != "all" and name not in installed:
            raise DataError(f"--log-with {name}: not installed (or not a version accelerate "
                            f"{ACCELERATE_VERSION} can use): pip install {name}")
    for run in [f"{args.name}_fold{k}" for k in args.fold] + [f"{args.name}_lr_find"]:
        check_writable(Path(args.out) / "logs" / run, "--log-with's run log folder")
    return installed if "all" in args.log_with else list(dict.fromkeys(args.log_with))


def start_tracking(accelerator, run, step=None, values=None):
    """Open tracker run `run` with its settings, `values`: TensorBoard's hparams take numbers,
    text, booleans and None, a list (--external's folders) as its JSON. From `step` on,
    TensorBoard's reader drops what an interrupted process logged (a resumed fold logs once)."""
    plain = (bool, int, float, str, type(None))
    config = {k: v if isinstance(v, plain) else json.dumps(v) for k, v in (values or {}).items()}
    accelerator.init_trackers(run, config if values else None,
                              {} if step is None else {"tensorboard": {"purge_step": step}})


def end_tracking(accelerator, pngs, step=None):
    """Log PNG files ({tag: path}) to the trackers that take images, and close the runs; not
    with accelerator.end_training, which also ends the process group the next fold trains in."""
    for tracker in accelerator.trackers:
        if tracker.name in IMAGE_KWARGS:
            images = {tag: np.asarray(Image.open(f).convert("RGB"))[None]
                      for tag, f in pngs.items()}
            tracker.log_images(images, step, **IMAGE_KWARGS[tracker.name])
        tracker.finish()
    accelerator.trackers.clear()


# ----------------------------------------------------------------------------------------------
# Using a trained model: predict new images, and see where it looks (Grad-CAM)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_run(out, name):
    """{fold: (its JSON, its weights)} of run `name` in `out`, one model: the same settings."""
    folds = run_folds(out, name)
    if not folds:
        raise DataError(f"--name {name}: no weights in {out} (looked for "
                        f"{Path(out) / name}_fold{{k}}.safetensors)")
    runs = {}
    for fold, stem in folds.items():
        weights = stem.with_suffix(".safetensors")
        if not weights.is_file():
            raise DataError(f"{stem.with_suffix('.json')}: a finished fold without its weights "
                            f"({weights.name}); retrain the fold or move its JSON away")
        runs[fold] = (read_saved(stem.with_suffix(".json")), weights)
    (first, first_weights), *_ = runs.values()
    for info, weights in runs.values():
        differ = differences(first["run"], info["run"], (first_weights.name, weights.name))
        if differ:
            raise DataError(f"--name {name}: {weights.name} and {first_weights.name} are different "
                            f"models ({'; '.join(differ)}); give each its own --name")
    return runs


def load_trained(info, weights, accelerator):
    """A finished fold's model on the device, and the augmentation it trained with (its TTA
    views) as its JSON records it: the --augs file may have been edited since."""
    a = SimpleNamespace(**info["args"])  # a run older than --target has no classes: one logit
    raw_model = ExtrasNet(Net.timm_backbone(a.model, False),
                          **ExtrasNet.shape(a, info.get("meta"), info.get("classes")))
    try:
        raw_model.load_state_dict(safetensors_load(Path(weights).read_bytes()))
    except Exception as e:  # safetensors' own error for a damaged file, torch's for a misfit
        raise DataError(f"{weights}: does not load into {a.model} ({one_line(e)[:160]})")
    entries = info["augs"] if "augs" in info else aug_entries(a)
    return on_device(raw_model, a.cutout, Augment.build(entries, OWN_AUGS), accelerator)


def images_to_predict(file, data_dir, meta):
    """Rows with image_name and path: each JPEG/PNG under a folder (named by its path in it), or
    a CSV's, each found where it is: the CSV's folder or --data-dir, its jpeg/test, test, ..."""
    file = Path(file)
    if file.is_dir():
        if meta:
            raise DataError(f"--predict {file}: the model was trained with --meta: pass a CSV "
                            f"with image_name and {', '.join(META_COLUMNS)}")
        # a broken link or a folder named like an image is kept: checking it reports it
        files = sorted(p for p in file.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"--predict {file}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
        return pd.DataFrame(dict(image_name=[p.relative_to(file).as_posix() for p in files],
                                 path=[str(p) for p in files]))
    root = Path(data_dir) if data_dir else file.parent
    rows = read_csv(file, ["image_name"], "--predict file")
    folders = [root / sub for sub in ("", "jpeg/test", "test", "jpeg/train", "train")]
    rows["path"] = [str(next((d / f"{n}.jpg" for d in folders if (d / f"{n}.jpg").is_file()),
                             root / f"{n}.jpg")) for n in rows["image_name"]]
    return meta_columns(rows, f"--predict file {file}") if meta else rows


def predict_images(args, accelerator):
    """--predict PATH: every fold of run --name scores the images, with its TTA seeds and batches
    as in training (a test image gets the number of the run's _test.csv); the folds averaged."""
    start = time.time()
    runs = load_run(args.out, args.name)
    spec = next(iter(runs.values()))[0].get("meta")
    out = Path(args.out) / f"{args.name}_predict.csv"
    skipped = Path(args.out) / f"{args.name}_predict_skipped.tsv"  # not a .csv: not predictions
    check_writable(args.out, "--out")
    check_output_files([out, skipped] + [fold_file(args, k, "_explain.png")
                                         for k in runs if args.explain])
    every = images_to_predict(args.predict, args.data_dir, spec is not None)
    bad = check_images(list(every["path"]), skip_bad=args.skip_bad,
                       hint="" if args.skip_bad else "; --skip-bad predicts the rest")
    rows = every[~every["path"].isin(bad)].reset_index(drop=True)
    rows = with_meta(rows, spec) if spec else rows
    scores = rows[["image_name"]].copy()
    load = functools.partial(cached_load, cache=args.cache) if args.cache else load_image
    for fold, (info, weights) in runs.items():
        a = SimpleNamespace(**info["args"])
        raw_model, augment = load_trained(info, weights, accelerator)
        model = accelerator.prepare_model(raw_model, evaluation_mode=True)
        images = Images(rows["path"], a.size, load, meta_inputs(rows) if spec else ())
        loader = make_loader(images, accelerator, SimpleNamespace(num_workers=args.num_workers,
                                                                  batch_size=a.batch_size))
        scores[f"fold{fold}"] = predict(model, augment, loader, accelerator, args.tta, a.seed + 1,
                                        f"fold {fold} TTA x{args.tta}",
                                        functools.partial(melanoma_logit,
                                                          classes=info.get("classes")))
    scores["target"] = scores[[f"fold{k}" for k in runs]].mean(axis=1)
    if accelerator.is_main_process:
        write_csv(scores, out)
        skipped.unlink(missing_ok=True)
        if bad:
            listed = every[every["path"].isin(bad)].assign(reason=lambda d: d["path"].map(bad))
            atomic_write(skipped, lambda tmp: listed[["image_name", "reason"]].to_csv(
                tmp, sep="\t", index=False))
            accelerator.print(f"skipped {len(bad)} unreadable image(s), listed in {skipped}")
    accelerator.print(f"wrote {out}: {len(scores)} images, {len(runs)} fold(s) averaged "
                      f"(target = their mean), TTA x{args.tta}, {time.time() - start:.0f} s")
    if args.explain:
        explain(args, accelerator, runs, rows.assign(**scores.filter(like="fold")))


def grad_cam(model, augment, x, meta=None, classes=None):
    """(probabilities, Grad-CAM maps in [0, 1] at the images' size), by the gradient of the
    melanoma log-odds: over several outputs, unlike log P(melanoma)'s, it does not vanish."""
    model.eval()
    with torch.no_grad():  # the gradient is needed from the feature maps on, not before
        feature_map = model.backbone.forward_features(augment(x, random=False))
    feature_map.requires_grad_()
    logits = melanoma_logit(model.logit(feature_map, meta), classes)
    grads, = torch.autograd.grad(logits.sum(), feature_map)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * feature_map).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(logits).detach(), cam.detach()


def explain(args, accelerator, runs=None, new=None):
    """--explain N: a grid per fold, {name}_fold{k}_explain.png: Grad-CAM of its OOF's N most
    confident false positives and negatives, and of the N new images it scores highest."""
    if runs is None:  # --explain alone; with --predict, that checked the outputs
        runs = load_run(args.out, args.name)
        check_writable(args.out, "--out")
        check_output_files(fold_file(args, k, "_explain.png") for k in runs)
    if not accelerator.is_main_process:
        return
    (info, _), *_ = runs.values()  # one model: its folds share the data and the metadata encoding
    data_dir, train = info["args"]["data_dir"], None
    if any(fold_file(args, k, "_oof.csv").is_file() for k in runs):  # its training images
        if layout_of(data_dir) is None:
            raise DataError(f"{data_dir}: the run's data folder holds no competition data now")
        train = read_images(Path(data_dir) / "train.csv", layout_of(data_dir)[0],
                            ["image_name", "target"], "train file", Hooks(None, None),
                            {"target": "0 or 1"})
        if info.get("meta"):
            train = with_meta(meta_columns(train, f"train file {data_dir}/train.csv"), info["meta"])
        train = train.set_index("image_name")
    for fold, (info, weights) in runs.items():
        cases, oof_file = [], fold_file(args, fold, "_oof.csv")  # the worst OOF, the top new ones
        if oof_file.is_file():
            oof = read_csv(oof_file, ["image_name", "pred"], "OOF file",
                           {"pred": "a finite number"})
            unknown = oof["image_name"][~oof["image_name"].isin(train.index)]
            if len(unknown):
                raise DataError(f"{oof_file}: {len(unknown)} image(s) not in the run's train.csv "
                                f"({Path(data_dir) / 'train.csv'}), e.g. {unknown.iloc[0]}")
            rows = train.loc[oof["image_name"]].reset_index().assign(score=oof["pred"].to_numpy())
            cases += [rows[rows["target"] == 0].nlargest(args.explain, "score").assign(
                case="false positive"), rows[rows["target"] == 1].nsmallest(
                args.explain, "score").assign(case="false negative")]
        if new is not None:
            cases.append(new.assign(score=new[f"fold{fold}"]).nlargest(args.explain, "score")
                         .assign(case="new, highest scored", target=np.nan))
        if not cases:
            raise DataError(f"--explain: fold {fold} of {args.name} has no OOF predictions "
                            f"({oof_file}) and there are no new images (--predict)")
        cases = pd.concat(cases, ignore_index=True)
        model, augment = load_trained(info, weights, accelerator)
        x = torch.stack([torch.from_numpy(load_image(p, info["args"]["size"])).permute(2, 0, 1)
                         for p in cases["path"]]).to(accelerator.device)
        meta = meta_inputs(cases)[0].to(x.device) if info.get("meta") else None
        probs, cams = grad_cam(model, augment, x, meta, info.get("classes"))
        figure = Figure(figsize=(5, 2.6 * len(cases)), layout="constrained")
        axes = figure.subplots(len(cases), 2, squeeze=False)
        for row, image, cam, case, p in zip(axes, x.permute(0, 2, 3, 1).cpu().numpy(),
                                            cams.cpu().numpy(), cases.itertuples(), probs.tolist()):
            target = "?" if pd.isna(case.target) else int(case.target)
            for ax, title in zip(row, (f"{case.case}\n{case.image_name}", f"target {target}, "
                                       f"p = {p:.3f}")):
                ax.imshow(image)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
            row[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        target = fold_file(args, fold, "_explain.png")
        atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
        start_tracking(accelerator, f"{args.name}_fold{fold}")
        end_tracking(accelerator, {"explain": target})
        accelerator.print(f"wrote {target}: Grad-CAM of {len(cases)} images")


# ----------------------------------------------------------------------------------------------
# Tools: folds, demo data, benchmark, LR range test

def write_csv(df, path):
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_folds(args, accelerator):
    """--make-folds, with a line on what each fold holds."""
    check_writable(args.out, "--out", folder=False)
    if Path(args.out).exists() and not args.overwrite:
        raise DataError(f"--out {args.out}: exists; pass --overwrite to replace it")
    if Path(args.out).resolve() == Path(args.make_folds).resolve():
        raise DataError(f"--out {args.out}: is the train file itself; give another name")
    where = f"train file {args.make_folds}"
    train = read_csv(args.make_folds, ["image_name", "patient_id", "target"], "train file",
                     {"target": "0 or 1", "tfrecord": "a whole number"})
    check_names(train, where, "patient_id", unique=False)
    folds = make_folds(train, args.n_folds, args.seed, where)
    write_csv(folds, args.out)
    counts = folds[folds["fold"] >= 0].groupby("fold")["target"].agg(["size", "sum"])
    per_fold = ", ".join(f"{k}: {n} images/{m} melanomas" for k, (n, m) in counts.iterrows())
    print(f"wrote {args.out}: {len(folds)} images, {folds['patient_id'].nunique()} patients, "
          f"{int((folds['fold'] < 0).sum())} left out (fold -1); per fold {per_fold}")


# The published 5-fold split of the resized datasets' patient-grouped tfrecord groups.
TFRECORD_FOLDS = {2: 0, 4: 0, 5: 0, 1: 1, 10: 1, 13: 1, 0: 2, 9: 2, 12: 2, 3: 3, 8: 3, 11: 3,
                  6: 4, 7: 4, 14: 4}


def make_folds(df, n_folds=5, seed=0, where="train.csv"):
    """Patient-grouped, stratified folds: image_name, patient_id, target, fold (-1: never used).
    By `tfrecord` (the resized datasets'): 5 folds are TFRECORD_FOLDS, the winners' split, others
    t % n_folds, a duplicate image (t -1) fold -1. Else patients with melanomas, most first, go
    to the fold with the fewest melanomas, the others, largest first, to the one with the fewest
    images (ties by a shuffle from `seed`); not StratifiedGroupKFold: it splits otherwise."""
    out = df[["image_name", "patient_id", "target"]].copy()
    if "tfrecord" in df.columns:
        t = df["tfrecord"]
        published = t.map(TFRECORD_FOLDS) if n_folds == 5 else t % n_folds
        out["fold"] = np.where(t < 0, -1, published.fillna(t % n_folds)).astype(int)
        return out
    patients = out.groupby("patient_id", sort=True)["target"].agg(["sum", "size"])
    if n_folds > len(patients):
        raise DataError(f"{where}: {n_folds} folds but only {len(patients)} patients")
    patients = patients.iloc[np.random.default_rng(seed).permutation(len(patients))]
    patients = patients.sort_values(["sum", "size"], ascending=False, kind="stable")
    pos, size = np.zeros(n_folds), np.zeros(n_folds)  # melanomas and images per fold so far
    fold_of = {}
    for pid, (n_pos, n) in zip(patients.index, patients.to_numpy()):
        k = int(np.lexsort((size, pos))[0]) if n_pos else int(np.argmin(size))
        fold_of[pid] = k
        pos[k] += n_pos
        size[k] += n
    out["fold"] = out["patient_id"].map(fold_of).astype(int)
    return out


def draw_lesion(h, w, malignant, r):
    """A skin-coloured image with one lesion, larger, more irregular, darker and bluer by a hidden
    score 1.5 standard deviations higher for melanomas: the best possible AUC is about 0.86."""
    s = np.clip(r.normal(1.5 if malignant else 0, 1) / 3, -0.5, 1.2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([225, 180, 150]) * r.uniform(0.8, 1.05) + r.normal(0, 6, (h, w, 3))
    cy, cx = h / 2 + r.uniform(-0.1, 0.1) * h, w / 2 + r.uniform(-0.1, 0.1) * w
    ang = np.arctan2(yy - cy, xx - cx)
    radius = min(h, w) * (0.16 + 0.1 * s) * r.uniform(0.85, 1.15)
    edge = radius * (1 + max(0.02, 0.2 * s) * np.sin(r.integers(3, 7) * ang + r.uniform(0, 6)))
    inside = (np.hypot(yy - cy, xx - cx) < edge)[..., None]
    colour = np.array([150, 100, 70]) - s * np.array([70, 45, 10]) + s * np.array([0, 0, 1]) * 20
    lesion = colour * r.uniform(0.85, 1.15) + r.normal(0, 5 + 8 * max(s, 0), (h, w, 3))
    return np.clip(np.where(inside, lesion, skin), 0, 255).astype(np.uint8)


def save_lesions(folder, names, malignant, r, shape):
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in zip(names, malignant):
        Image.fromarray(draw_lesion(*shape, bool(t), r)).save(folder / f"{name}.jpg", quality=90)


def make_demo_data(root, n_patients=150, n_test=60, seed=0, shape=(96, 128)):
    """A synthetic dataset in the official layout with 2-8 images per patient, about 6 %
    melanomas, several benign diagnoses, folds.csv and external data; only in an empty folder."""
    root = Path(root)
    check_writable(root, "--demo --data-dir")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"--demo --data-dir {root}: not an empty folder and no demo data "
                        "(train.csv) in it; the demo makes its data only in a new or empty folder")
    print(f"making the demo dataset in {root}/ (once)")
    r = np.random.default_rng(seed)
    sites = ["torso", "lower extremity", "head/neck"]
    rows = []
    for p in range(n_patients):
        for _ in range(r.integers(2, 9)):
            rows.append(dict(image_name=f"ISIC_{len(rows):07d}", patient_id=f"IP_{p:07d}",
                             sex=r.choice(["male", "female"]),
                             age_approx=float(r.integers(4, 18) * 5),
                             anatom_site_general_challenge=r.choice(sites),
                             target=int(r.random() < 0.06)))
    train = pd.DataFrame(rows)
    train.loc[r.choice(len(train), 5, replace=False), "target"] = 1
    train["diagnosis"] = demo_diagnoses(train["target"], seed)
    train["benign_malignant"] = np.where(train["target"] == 1, "malignant", "benign")
    test = pd.DataFrame(dict(image_name=[f"ISIC_{9000000 + i}" for i in range(n_test)],
                             patient_id=[f"IP_{9000000 + i // 3}" for i in range(n_test)]))
    meta = np.random.default_rng([seed, 2020])  # apart from r: the images stay as they were
    test["sex"] = meta.choice(["male", "female"], n_test)
    test["age_approx"] = meta.integers(4, 18, n_test) * 5.0
    test["anatom_site_general_challenge"] = meta.choice(sites, n_test)
    test_targets = r.random(n_test) < 0.06  # hidden: they only shape the test images
    save_lesions(root / "jpeg" / "train", train["image_name"], train["target"], r, shape)
    save_lesions(root / "jpeg" / "test", test["image_name"], test_targets, r, shape)
    write_csv(test, root / "test.csv")
    write_csv(make_folds(train, 5, seed), root / "folds.csv")
    make_demo_external(root / "isic2019", train["image_name"][:3], seed, shape)
    write_csv(train, root / "train.csv")  # last: its presence marks a complete dataset
    return root


def demo_diagnoses(targets, seed=0):
    """Melanoma for target 1, else benign diagnoses of the competition, drawn apart from the
    images' generator (they stay as they were); an image shows its target, not its diagnosis."""
    benign = {"unknown": 0.5, "nevus": 0.3, "seborrheic keratosis": 0.08, "lentigo NOS": 0.05,
              "lichenoid keratosis": 0.04, "solar lentigo": 0.03}
    drawn = np.random.default_rng([seed, 2021]).choice(list(benign), len(targets),
                                                        p=list(benign.values()))
    return np.where(np.asarray(targets) == 1, "melanoma", drawn)


def make_demo_external(root, duplicates, seed=0, shape=(96, 128), n=150):
    """Synthetic ISIC 2019 data in the resized layout, 18 % MEL, and `duplicates` of 2020's."""
    r = np.random.default_rng([seed, 2019])
    names = list(duplicates) + [f"ISIC_{1000000 + i:07d}" for i in range(n - len(duplicates))]
    malignant = r.random(n) < 0.18
    # ISIC 2019's training images are of 8 classes: UNK is only in its test set
    benign = r.choice([c for c in DIAGNOSES_2019 if c not in ("MEL", "UNK")], n)
    df = pd.DataFrame(dict(image_name=names, patient_id=[f"EX_{i // 2:05d}" for i in range(n)],
                           sex=r.choice(["male", "female"], n),
                           age_approx=r.integers(4, 18, n) * 5.0,
                           anatom_site_general_challenge=r.choice(
                               ["torso", "lower extremity", "head/neck", "palms/soles"], n),
                           diagnosis=np.where(malignant, "MEL", benign)))
    save_lesions(root / "train", names, malignant, r, shape)
    write_csv(df, root / "train.csv")


def benchmark_jpegs(folder, seed=0):
    """JPEGs like the competition's originals: a lesion photo at 6000x4000 (2.7 MB) and
    1872x1053, and a noisier 6000x4000 (3.8 MB), whose entropy decoding costs more."""
    r, files = np.random.default_rng(seed), {}
    for w, h, noise in ((6000, 4000, 0), (6000, 4000, 2), (1872, 1053, 0)):
        photo = Image.fromarray(draw_lesion(h // 16, w // 16, True, r))
        photo = np.asarray(photo.resize((w, h), Image.BICUBIC))
        grain = r.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        grain = np.asarray(Image.fromarray(grain).resize((w, h), Image.BICUBIC))
        pixels = photo * 0.9 + grain * 0.1 + (r.normal(0, noise, (h, w, 1)) if noise else 0)
        path = os.path.join(folder, f"{w}x{h}{'_noisy' if noise else ''}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        files[path] = os.path.getsize(path) / 1e6
    return files


def seconds(fn, repeat=3, sync=lambda: None):
    """Best of `repeat` timed calls, after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def benchmark(args, accelerator):
    """Images/s of loading, augmentation, a training step (train_one_epoch's, under training's
    Accelerator) and TTA on this machine, with ratios."""
    device = accelerator.device
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} cores"
    print(f"benchmark: {device} ({machine}), torch {torch.__version__}, --size {args.size} "
          f"--model {args.model} --batch-size {args.batch_size} --tta {max(args.tta, 1)} "
          f"--mixed-precision {accelerator.mixed_precision}")
    with tempfile.TemporaryDirectory() as tmp:
        files = benchmark_jpegs(tmp)
        print("(a) loading, one process, img/s     ours    plain  ratio  "
              "(1/8-scale decode, the floor)")
        per_image = []

        def floor(f):  # the 1/8-scale decode: the least a JPEG costs, its entropy decoding
            with Image.open(f) as im:
                im.draft("RGB", (1, 1))
                im.load()

        for f, mb in files.items():
            ours = seconds(lambda: load_image(f, args.size), 5)
            plain = seconds(lambda: Image.open(f).convert("RGB").resize((args.size,) * 2), 5)
            per_image.append(np.array([ours, plain]))
            print(f"    {Path(f).stem:>15} {mb:3.1f} MB {1 / ours:7.1f}  {1 / plain:7.2f}  "
                  f"{plain / ours:4.1f}x  ({1 / seconds(lambda: floor(f), 5):.1f})")
        ours, plain = 0.44 * per_image[0] + 0.56 * per_image[2]
        print(f"    mix, 44 % 6000x4000   {1 / ours:7.1f}  {1 / plain:7.2f}  {plain / ours:4.1f}x")
        benchmark_steps(args, accelerator, files, os.path.join(tmp, "cache"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
    print(f"peak memory: process {peak:.2f} GiB" + (f", GPU {gpu:.2f} GiB" if gpu else ""))


def benchmark_steps(args, accelerator, files, cache):
    """(b) the augmentation, (c) the training step bare and with loading, (d) TTA."""
    device, size, bs, tta = accelerator.device, args.size, args.batch_size, max(args.tta, 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    raw_model = ExtrasNet(Net.timm_backbone(args.model, False), **ExtrasNet.shape(args, None, None))
    _, model, augment, optimizer, scheduler = build_training(
        args, accelerator, raw_model, Augment.build(aug_entries(args), OWN_AUGS), 10**6)
    x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device)
    targets, idx = torch.zeros(bs), torch.arange(bs)
    print(f"(b) augmentation stack {bs / seconds(lambda: augment(x), sync=sync):10.1f} img/s")

    def step(batch):
        train_one_epoch(model, augment, [(batch, idx)], optimizer, scheduler, accelerator,
                        targets, 0, 1)

    def load_batch(load=lambda f: load_image(f, size)):  # 44 % large originals
        batch = [load(big if i % 25 < 11 else small) for i in range(bs)]
        return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)

    big, _, small = files
    bare = bs / seconds(lambda: step(x), sync=sync)
    print(f"(c) training step, bare (tensors on the device) {bare:8.1f} img/s")
    for what, load in (("decoding originals", lambda f: load_image(f, size)),
                       ("reading --cache", lambda f: cached_load(f, size, cache))):
        whole = bs / seconds(lambda: step(load_batch(load)), 2, sync)
        print(f"    whole step, {what:<18} {whole:8.1f} img/s, {bare / whole:5.2f}x the bare "
              "step (one loader process)")
    model.eval()
    with torch.no_grad():
        once = bs / seconds(lambda: predict_batch(model, augment, load_batch(), tta, (0,)), 1, sync)
        again = bs / seconds(lambda: [torch.sigmoid(model(augment(load_batch())))
                                      for _ in range(tta)], 1, sync)
    print(f"(d) TTA x{tta}, decode once {once:8.1f} img/s; re-read per pass {again:8.1f} "
          f"img/s; ratio {once / again:4.1f}x")


# The noise band: the smoothed loss +- this many standard errors. A fall counts when the band at
# the lowest point lies wholly below the band at the start: some 3 standard errors of their
# difference, not 2, as the lowest point of a noisy curve is itself biased low.
LR_BAND = 2


def endless(loader, sampler, args, accelerator):
    """The training batches, epoch after epoch, each epoch's draws keyed as in training."""
    for epoch in itertools.count():
        seed_all(args.seed, AUGMENT, epoch, accelerator.process_index)
        sampler.set_epoch(epoch)
        yield from loader


def lr_range_test(raw_model, augment, batches, targets, accelerator, args, beta=0.98):
    """Steps of AdamW on a copy of raw_model at a rate rising exponentially over --lr-find's
    range, until the loss diverges (not finite, or its bias-corrected exponential average 4x its
    lowest). A step's loss is the mean of --lr-find-batches batches at the same weights."""
    model = copy.deepcopy(raw_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr_find_start, weight_decay=args.wd)
    growth = (args.lr_find_end / args.lr_find_start) ** (1 / (args.lr_find_steps - 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, growth)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    rows, mean, lowest = [], 0.0, math.inf
    for step in range(args.lr_find_steps):
        chunk = [(x, targets[idx], inputs)
                 for x, *inputs, idx in itertools.islice(batches, args.lr_find_batches)]
        if len(chunk) < args.lr_find_batches:
            break
        lr = scheduler.get_last_lr()[0]
        with torch.no_grad():  # the extra batches measure the loss at these weights
            losses = [batch_loss(model, augment, x, y, accelerator, inputs).item()
                      for x, y, inputs in chunk[:-1]]
        x, y, inputs = chunk[-1]
        losses.append(train_step(model, augment, x, y, optimizer, scheduler, accelerator,
                                 inputs)[0])
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            break
        mean = beta * mean + (1 - beta) * loss
        smoothed = mean / (1 - beta ** (step + 1))
        lowest = min(lowest, smoothed)
        rows.append(dict(step=step + 1, lr=lr, loss=loss))
        if smoothed > 4 * lowest:
            break
    return pd.DataFrame(rows, columns=["step", "lr", "loss"])


def noise_band(loss):
    """(smoothed loss, its standard error, the per-step noise) per step: a centred mean (a 20th of
    the curve either side; an exponential one would trail the rate by some 50 steps), and the
    noise robust (median absolute deviation) and local (a 10th either side): a batch's loss
    scatters more once the model has learnt, and far more as it diverges."""
    loss = pd.Series(np.asarray(loss, float))
    window = loss.rolling(2 * max(2, len(loss) // 20) + 1, center=True, min_periods=1)
    smoothed = window.mean()
    noise = 1.4826 * (loss - smoothed).abs().rolling(2 * max(2, len(loss) // 10) + 1,
                                                     center=True, min_periods=1).median()
    return smoothed.to_numpy(), (noise / np.sqrt(window.count())).to_numpy(), noise.to_numpy()


def class_mix_entropy(labels):
    """The loss (nats) of a model that has learnt only the mix of classes in its batches, not the
    images: a curve that never gets below it has learnt nothing else."""
    shares = np.bincount(np.asarray(labels, int)) / len(labels)
    return float(-(shares * np.log(shares, where=shares > 0, out=np.zeros_like(shares))).sum())


def suggest_lrs(curve):
    """The second rule: (--lr-min, --lr-max a tenth of the rate at the lowest smoothed loss, where
    training nears divergence, Smith's rule; that rate); the first tenth of the steps left out:
    there a mean of fewer steps makes false minima."""
    tail = curve.iloc[len(curve) // 10:]
    lowest = float(tail["lr"][tail["smoothed"].idxmin()])
    lr_max = max(lowest / 10, float(curve["lr"].iloc[0]))
    return lr_max / 40, lr_max, lowest


def read_lr_curve(curve, entropy=None, diverged=False):
    """What a range test's curve (lr, loss per step) says. Flat: the band at the lowest point
    never gets wholly below the band at the start, or below the class mix's `entropy`. Still
    falling: the loss has not climbed beyond the noise by the last step and did not diverge.
    Else a valley, and --lr-max (fastai's valley rule) the rate halfway down the fall, which
    noisier steps at the bottom do not move."""
    smoothed, se, noise = noise_band(curve["loss"])
    curve = curve.reset_index(drop=True).assign(smoothed=smoothed)
    lr = curve["lr"].to_numpy(float)
    low, high = smoothed - LR_BAND * se, smoothed + LR_BAND * se
    _, second_lr, lowest_lr = suggest_lrs(curve)
    bottom = int(np.flatnonzero(lr == lowest_lr)[0])
    top = int(np.argmax(smoothed[:bottom + 1]))
    # the fall: from the last step within the noise of the top to the first within the bottom's
    fall = top + int(np.flatnonzero(high[top:bottom + 1] >= low[top])[-1])
    fallen = fall + int(np.flatnonzero(low[fall:bottom + 1] <= high[bottom])[0])
    halfway = top + int(np.flatnonzero(smoothed[top:] <= (smoothed[top] + smoothed[bottom]) / 2)[0])
    verdict = "valley"
    if high[bottom] >= min(low[0], math.inf if entropy is None else entropy):
        verdict = "flat"
    elif low[-1] <= high[bottom] and not diverged:
        verdict = "still falling"
    lr_max = None if verdict == "flat" else float(lr[halfway])
    return dict(verdict=verdict, lr_min=None if lr_max is None else lr_max / 40, lr_max=lr_max,
                fall=None if lr_max is None else (float(lr[fall]), float(lr[fallen])),
                highest=float(smoothed[top]), lowest=float(smoothed[bottom]),
                lowest_lr=float(lr[bottom]), second_lr=second_lr,
                start=float(smoothed[0]), noise=float(noise[bottom]),
                lowest_se=float(se[bottom]), entropy=entropy, smoothed=smoothed, band_low=low,
                band_high=high)


def verdict_line(r):
    noise = f"noise {r['noise']:.3f} per step, {r['lowest_se']:.3f} on the smoothed loss's lowest"
    if r["verdict"] == "flat":
        below = f"its start ({r['start']:.3f})"
        if r["entropy"] is not None:
            below = f"the lower of {below} and the class mix's entropy ({r['entropy']:.3f})"
        return (f"flat: the smoothed loss never got below {below} by more than the noise "
                f"(lowest {r['lowest']:.3f} at {r['lowest_lr']:.1e}; {noise}), so no --lr-max "
                "can be read from it: raise --lr-find-steps or --batch-size, or average "
                "batches with --lr-find-batches 4")
    line = (f"{r['verdict']}: suggested --lr-min {r['lr_min']:.1e} --lr-max {r['lr_max']:.1e}, "
            f"halfway down the smoothed loss's fall from {r['highest']:.3f} to {r['lowest']:.3f} "
            f"(a tenth of the lowest loss's rate: {r['second_lr']:.1e}); {noise}")
    return line + ("; the loss still fell at the end of the range: a higher --lr-find-end shows "
                   "where it diverges" if r["verdict"] == "still falling" else "")


def lr_find(args, accelerator):
    """--lr-find: the range test on the first --fold's training images, with the model, inputs
    and epoch samples that training would have (the same seams); no weights are kept."""
    if accelerator.num_processes > 1:
        raise DataError("--lr-find runs in one process: start it with python, not accelerate "
                        "launch or torchrun")
    stem = Path(args.out) / f"{args.name}_lr_find"
    check_output_files([f"{stem}.csv", f"{stem}.png"])
    check_run(args, accelerator)
    hooks = Extras(args, accelerator)
    train, _ = hooks.rows(*read_data(args, hooks, accelerator.print))
    fold = args.fold[0]
    trn, _ = split_fold(train, fold, args.frac, args.seed)
    sampler = hooks.sampler(trn)
    loader = make_loader(hooks.images(trn), accelerator, args, sampler)
    seed_all(args.seed, INIT)
    raw_model, targets, _ = hooks.model(fold, trn)
    raw_model, augment = on_device(raw_model, args.cutout, hooks.augmentations(), accelerator)
    start = time.time()
    curve = lr_range_test(raw_model, augment, endless(loader, sampler, args, accelerator), targets,
                          accelerator, args)
    if len(curve) < 10:
        raise DataError(f"--lr-find: the loss diverged after {len(curve)} step(s), at a rate of "
                        f"{curve['lr'].iloc[-1] if len(curve) else args.lr_find_start:.1e}: lower "
                        "--lr-find-start, or --lr-find-end for a slower rise")
    diverged = len(curve) < args.lr_find_steps
    sample = EpochSampler.indices(sampler.targets, sampler.per_epoch, args.seed, 0, sampler.pools)
    reading = read_lr_curve(curve, class_mix_entropy(targets.long()[sample]), diverged)
    curve = curve.assign(**{k: reading[k] for k in ("smoothed", "band_low", "band_high")})
    last = curve["lr"].iloc[-1]
    ended = "the loss diverged" if diverged else "end of the range"
    batches = f" x {args.lr_find_batches} per step" if args.lr_find_batches > 1 else ""
    title = (f"{args.name}: LR range test, fold {fold}, {args.size} px, batch {args.batch_size}"
             f"{batches}\n{len(curve)} steps up to {last:.1e} ({ended}): {reading['verdict']}")
    fig = plot_lr_find(curve, reading, title, f"cross-entropy, {len(hooks.classes)} classes"
                       if hooks.classes else "BCE")
    atomic_write_all({f"{stem}.csv": lambda tmp: curve.to_csv(tmp, index=False),  # both or none
                      f"{stem}.png": lambda tmp: fig.savefig(tmp, format="png", dpi=100)})
    if accelerator.log_with:
        start_tracking(accelerator, f"{args.name}_lr_find", 0, dict(
            run_key(args, accelerator), name=args.name, fold=fold,
            **{k: v for k, v in vars(args).items() if k.startswith("lr_find_")}))
        for row in curve.itertuples():
            accelerator.log({"lr_find/loss": row.loss, "lr_find/smoothed": row.smoothed,
                             "lr_find/lr": row.lr}, step=int(row.step))
        end_tracking(accelerator, {"lr_find": f"{stem}.png"}, int(curve["step"].iloc[-1]))
    print(f"lr-find: {verdict_line(reading)}; {len(curve)} steps up to {last:.1e} ({ended}), "
          f"{time.time() - start:.0f} s; wrote {stem}.csv and {stem}.png")


# ----------------------------------------------------------------------------------------------
# main

# The tools, by flag: one a run (--explain also goes with --predict); without one, training.
TOOLS = {"make_folds": write_folds, "benchmark": benchmark,
         "runs": lambda args, accelerator: print_runs(args.runs),
         "lr_find": lr_find, "predict": predict_images, "explain": explain}


def main(argv=None):
    # SIGTERM (timeout, batch schedulers) ends the run like Ctrl-C: temporary files are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: stop(128 + signum))
    args = get_args(argv)
    try:
        accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                                  log_with=tracker_names(args) if args.log_with else None,
                                  project_dir=Path(args.out) / "logs")
        tool = next((TOOLS[t] for t in TOOLS if getattr(args, t)), None)
        if tool:
            tool(args, accelerator)
        else:
            check_run(args, accelerator)
            train_folds(args, accelerator, Extras(args, accelerator))
        sys.stdout.flush()
    except (DataError, FloatingPointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the output went to a command that stopped reading it (head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        stop(130)


def stop(code):
    print("stopped: no output was half-written; a training run continues from its last finished "
          "epoch when the same command is run again with --resume", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
