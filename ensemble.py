"""ensemble.py: blend prediction files into a submission, with a cross-validation score that stays
honest.

    python ensemble.py preds/*.csv                      # mean of probabilities -> submission.csv
    python ensemble.py preds/*.csv --method weighted    # or rank, stack
    python ensemble.py preds/*.csv downloaded_sub.csv --method rank --out blend.csv

Files named {name}_fold{k}_oof.csv (image_name,target,pred,fold) and {name}_fold{k}_test.csv
(image_name,target) are one model per {name}: its OOF files concatenated, its test predictions
averaged over folds. Any other image_name,target file is a model with test predictions only;
melanoma.py's ledger of runs (runs.csv, which preds/*.csv matches) is left out with a note.
`mean`, `weighted` and `stack` take probabilities in [0, 1]; `rank` takes any finite scores.
Reports, per model and per method, the CV AUC on the concatenated OOF with a 95 % interval from a
bootstrap over patients (ids from --folds, else from the folds file the runs recorded in their
{name}_fold{k}.json); `weighted` and `stack` are scored by nested CV (fitted on the other folds,
scored on the held-out one). The report is printed and written beside --out as {stem}.json, with
a heat map of the models' correlations as {stem}_correlation.png. Bad input is refused in one line
(exit code 2) before anything is written. melanoma.py imports its torch-free helpers from here: the
CSV reader, DataError, atomic writes, the output checks and the ledger.

It starts in under half a second (no torch); a 1,000-resample patient bootstrap of the 32,692
ISIC 2020 OOF predictions takes about 0.6 s on one CPU core; the heat map adds 1-1.5 s (matplotlib,
measured on a busy 2-core machine).
"""
import argparse, csv, functools, io, json, math, os, re, shlex, sys, tempfile, warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

METHODS = ("mean", "rank", "weighted", "stack")
PROBABILITY_METHODS = ("mean", "weighted", "stack")  # rank takes any scores
NAME = re.compile(r"^(?P<name>.+)_fold(?P<fold>\d+)_(?P<kind>oof|test)\.csv$")
# Every file name melanoma.py writes in its output folder: --out must never replace one.
MELANOMA_OUTPUT = re.compile(r"^(runs\.csv|logs|folds\.csv|train\.csv|test\.csv"
                             r"|.+_fold\d+(_\w+)?\.\w+|.+_(predict|predict_skipped|lr_find)"
                             r"\.(csv|tsv|png)|.+_\d+_[0-9a-f]{16}\.jpg)$", re.I)  # last: --cache
OOF_COLUMNS = ["image_name", "target", "pred", "fold"]
# melanoma.py's ledger of runs, a row per finished fold in its output folder: `preds/*.csv`
# matches it, yet it holds no predictions. Recognised by its name and header.
LEDGER_FILE = "runs.csv"
LEDGER = ["date", "name", "fold", "oof_auc", "oof_auc_no_tta", "wall_s", "settings", "out"]
TEST_COLUMNS = ["image_name", "target"]


class DataError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is bad input like any other: one line, exit code 2 (not argparse's usage)."""
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_args(argv=None):
    p = ArgumentParser(description="Blend prediction files into a submission.")
    p.add_argument("files", nargs="+",
                   help="prediction CSVs: {name}_fold{k}_{oof,test}.csv or plain submissions")
    p.add_argument("--method", choices=METHODS, default="mean",
                   help="how the submission is blended; all but rank take probabilities in [0, 1] "
                        "(default: %(default)s)")
    p.add_argument("--out", type=text, default="submission.csv",
                   help="submission CSV (not .json); the report goes beside it as {stem}.json "
                        "(default: %(default)s)")
    p.add_argument("--folds", type=text,
                   help="image_name,patient_id CSV for the patient bootstrap (default: the folds "
                        "file that the runs recorded in the {name}_fold{k}.json beside their "
                        "prediction files, if they agree, else ./folds.csv if present; without "
                        "patient ids the bootstrap is over images)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95 %% intervals, 0 for none "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap (default: %(default)s)")
    args = p.parse_args(argv)
    for flag, value, most in (("--bootstrap", args.bootstrap, 10**6), ("--seed", args.seed, None)):
        if value < 0 or most is not None and value > most:
            p.error(f"argument {flag}: must be {'0 or more' if value < 0 else f'at most {most}'}, "
                    f"got {value}")
    if args.out.endswith(("/", os.sep)) or Path(args.out).name in ("", ".", ".."):
        p.error(f"--out {args.out!r}: give a file path for the submission")
    return args


def output_paths(out):
    """The submission, the report and the heat map: out, {stem}.json, {stem}_correlation.png."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_name(f"{out.stem}_correlation.png")


def check_outputs(out, inputs):
    """Refuse an --out that cannot be written, or whose outputs would overwrite an input, each
    other or a file of melanoma.py, before anything is read."""
    paths = output_paths(out)
    if paths[0].suffix.lower() == ".json":
        raise DataError(f"--out {out}: the report goes beside the submission as {{stem}}.json and "
                        "would overwrite it; give a .csv path")
    given = {Path(f).resolve(): f for f in inputs}
    for p in paths:
        check_writable(p, "--out", folder=False)
        if p.resolve() in given:
            raise DataError(f"--out {out}: would overwrite the input {given[p.resolve()]}")
        if MELANOMA_OUTPUT.match(p.name):
            raise DataError(f"--out {out}: {p.name} is the name of a file melanoma.py writes (its "
                            "ledger, a run's fold, prediction or LR-finder outputs), which the "
                            "submission or its report would replace; give another name")


# ------------------------------------------------------------------------------------------------
# Reading

def read_csv(path, columns, what="", numbers=None):
    """A CSV with `columns` and at least one row, all read as text, whose image names (if it has
    them) are unique, non-empty and without surrounding spaces, and whose columns of `numbers`
    ({column: kind}, see check_numbers) are numbers of their kind. Errors name the file, after
    `what` it is. melanoma.py reads its CSVs with it too."""
    where = f"{what} {path}".strip()
    if Path(path).is_dir():
        raise DataError(f"{where}: is a folder, not a CSV file")
    try:
        # no NA parsing: an image named "NA" stays a name, and an empty cell stays ""; a row with
        # a field too many is refused (pandas would take the first column as an index, shifted)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except FileNotFoundError:
        raise DataError(f"{where}: no such file")
    except pd.errors.ParserWarning:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = csv.reader(f)
            width = len(next(rows))
            row = next((i for i, r in enumerate(rows, 2) if len(r) > width), "?")
        raise DataError(f"{where}: row {row}: more fields than the header's {width}; cannot read "
                        "it as CSV")
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read it as CSV ({' '.join(str(e).split())})")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} "
                        f"(has: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise DataError(f"{where}: a header and no rows")
    if "image_name" in columns:
        check_names(df, where)
    return check_numbers(df, numbers or {}, where)


def check_names(df, where, column="image_name", unique=True):
    """Every name present and without surrounding spaces (it names a file), and unique."""
    names = df[column]
    refuse_rows(where, names.str.strip() == "", names, f"{column} is empty")
    refuse_rows(where, names.str.strip() != names, names,
                f"{column} {{value!r}} has surrounding spaces")
    if unique:
        refuse_rows(where, names.duplicated(), names, f"duplicate {column} {{value}}")


def refuse_rows(where, bad, values, problem):
    """DataError naming the first row where `bad` holds, numbered as in the file (the header is
    row 1), with `problem` formatted with that row's value."""
    bad = np.asarray(bad, bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: row {i + 2}: " + problem.format(value=values.iloc[i]))


# What a column of numbers may hold (check_numbers' kinds): whether a value is bad, its type.
NUMBER_KINDS = {
    "0 or 1": (lambda v, text: ~v.isin([0, 1]), int),
    "a whole number": (lambda v, text: ~np.isfinite(v) | (v != v.round()), int),
    "a finite number": (lambda v, text: ~np.isfinite(v), float),
    "a finite number or empty": (lambda v, text: ~np.isfinite(v) & (text.str.strip() != ""), float)}


def check_numbers(df, kinds, where):
    """df with each column of `kinds` ({column: kind of NUMBER_KINDS}) turned into numbers of
    that kind (an empty cell NaN); the first row that holds no such number is refused."""
    for column, kind in kinds.items():
        if column in df.columns:
            values = pd.to_numeric(df[column], errors="coerce").astype(float)
            bad, cast = NUMBER_KINDS[kind]
            refuse_rows(where, bad(values, df[column].astype(str)), df[column],
                        f"{column} must be {kind}, got {{value!r}}")
            df[column] = values.astype(cast)
    return df


def read_predictions(path, kind, probabilities):
    """An OOF (image_name,target,pred,fold) or test (image_name,target) file of finite numbers,
    OOF targets 0 or 1 and whole folds; predictions in [0, 1] if `probabilities`."""
    columns = OOF_COLUMNS if kind == "oof" else TEST_COLUMNS
    numbers = dict(target="0 or 1", pred="a finite number", fold="a whole number") \
        if kind == "oof" else dict(target="a finite number")
    df = read_csv(path, columns, numbers=numbers)[columns]
    pred = df["pred" if kind == "oof" else "target"]
    if probabilities and not pred.between(0, 1).all():
        raise DataError(f"{path}: {pred.name} ranges over [{pred.min():.4g}, {pred.max():.4g}], "
                        "not probabilities in [0, 1] (--method rank takes any scores)")
    return df


@dataclass
class Model:
    """One model: OOF predictions (index image_name; target, pred, fold) or None, and test
    predictions averaged over folds (index image_name), listed in its first test file's order."""
    name: str
    files: list
    oof: pd.DataFrame | None
    test: pd.Series
    test_file: str | None  # None: no test predictions (a run without test.csv)
    order: list


def load_models(files, probabilities):
    """{name: Model}: the files grouped by model name, each read and checked once."""
    parts, seen = {}, {}
    for f in files:
        if Path(f).name in seen:
            raise DataError(f"{seen[Path(f).name]} and {f}: the same file name twice, whose "
                            "predictions would merge into one model")
        seen[Path(f).name] = f
        m = NAME.match(Path(f).name)
        name, kind = (m["name"], m["kind"]) if m else (Path(f).stem, "test")
        part = parts.setdefault(name, dict(files=[], oof=[], test=[]))
        part["files"].append(str(f))
        part[kind].append((str(f), read_predictions(f, kind, probabilities)))
    models = {name: make_model(name, p["files"], p["oof"], p["test"]) for name, p in parts.items()}
    with_test = [m for m in models.values() if m.test_file]
    for m in with_test[1:]:
        check_same_images(with_test[0].test_file, with_test[0].order, m.test_file, m.order)
    return models


def make_model(name, files, oof_parts, test_parts):
    """A Model from its [(file, DataFrame)] OOF and test parts."""
    if not test_parts:
        return Model(name, files, concat_oof(name, oof_parts), pd.Series(dtype=float), None, [])
    (test_file, first), *others = test_parts
    for f, df in others:
        check_same_images(test_file, first["image_name"], f, df["image_name"])
    test = pd.concat([df.set_index("image_name")["target"] for _, df in test_parts], axis=1)
    return Model(name, files, concat_oof(name, oof_parts), test.mean(axis=1), test_file,
                 first["image_name"].tolist())


def concat_oof(name, parts):
    """A model's OOF files as one frame indexed by image_name, or None without any."""
    if not parts:
        return None
    oof = pd.concat([df for _, df in parts], ignore_index=True)
    dup = oof["image_name"].duplicated()
    if dup.any():
        first = oof["image_name"][dup].iloc[0]
        raise DataError(f"model {name}: OOF files overlap on image {first}")
    return oof.set_index("image_name")


def check_same_images(file_a, names_a, file_b, names_b):
    only_a = sorted(set(names_a) - set(names_b))[:3]
    only_b = sorted(set(names_b) - set(names_a))[:3]
    if only_a or only_b:
        lacks = [f"{b} lacks {', '.join(names)}"
                 for b, names in ((file_b, only_a), (file_a, only_b)) if names]
        raise DataError(f"{file_a} and {file_b} hold different test images: {'; '.join(lacks)}")


def read_patients(path):
    """patient_id by image_name from a folds file, or None if it has no patient_id column."""
    df = read_csv(path, ["image_name"], "folds file")
    if "patient_id" not in df.columns:
        return None
    ids = df["patient_id"]
    refuse_rows(f"folds file {path}", ids.str.strip() == "", ids, "patient_id is empty")
    return df.set_index("image_name")["patient_id"]


def run_files(files):
    """The runs' JSON beside the prediction files: {dir}/{name}_fold{k}.json for each
    {dir}/{name}_fold{k}_{oof,test}.csv, where it exists."""
    runs = [Path(f).with_name(f"{m['name']}_fold{m['fold']}.json")
            for f in files if (m := NAME.match(Path(f).name))]
    return [run for run in dict.fromkeys(runs) if run.exists()]


def read_run(run):
    """A run's JSON, {name}_fold{k}.json, with its args."""
    try:
        record = json.loads(Path(run).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{run}: cannot read the run's JSON ({e})")
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        raise DataError(f"{run}: not a run's JSON (no \"args\" object)")
    return record


def check_one_recipe(files):
    """One name is one model, averaged over its folds: its runs (their JSONs beside the files)
    must have the same settings, as melanoma.py's --predict requires too."""
    first = {}
    for run in run_files(files):
        key = read_run(run).get("run")
        other = first.setdefault(run.name.rsplit("_fold", 1)[0], (run, key))
        if isinstance(key, dict) and isinstance(other[1], dict) and key != other[1]:
            changed = sorted(k for k in set(key) | set(other[1]) if key.get(k) != other[1].get(k))
            raise DataError(f"{other[0]} and {run}: one model name, two recipes (they differ in "
                            f"{', '.join(changed)}); give each its own name")


def find_recorded(folds, run):
    """A folds path as a run recorded it, relative to the folder the run was started in: tried
    from the current folder, then from the parent of the run's output folder. None if neither."""
    for path in (Path(folds), Path(run).absolute().parent.parent / folds):
        if path.exists():
            return path.resolve()
    return None


def choose_folds(folds, files):
    """The folds file for the patient ids: (path or None, whence, notes). --folds wins; else the
    one all the runs recorded; else ./folds.csv if present."""
    if folds:
        return folds, "given by --folds", []
    recorded, notes = {}, []
    for run in run_files(files):
        given = read_run(run)["args"].get("folds")  # as the run was given it
        if given is not None and not isinstance(given, str):
            raise DataError(f"{run}: args.folds is {given!r}, not a path")
        found = find_recorded(given, run) if given else None
        if given and not found:
            notes.append(f"{run} records folds file {given}, found neither here nor in "
                         f"{Path(run).absolute().parent.parent}")
        if found:
            recorded.setdefault(found, run)
    if len(recorded) > 1:
        (a, run_a), (b, run_b) = list(recorded.items())[:2]
        notes.append(f"the runs record different folds files: {a} ({run_a}) and {b} ({run_b})")
    if len(recorded) == 1 and not notes:
        return next(iter(recorded)), "recorded by the runs", []
    fallback = Path("folds.csv")
    return (fallback if fallback.exists() else None), "in the current folder", notes


def find_patients(folds, files):
    """(patient_id by image_name or None, where they came from, notes) for the bootstrap."""
    path, whence, notes = choose_folds(folds, files)
    patients = read_patients(path) if path else None
    if path and patients is None:
        notes.append(f"folds file {path} has no patient_id column")
    return patients, f"patient ids from {path}, {whence}", notes


# ------------------------------------------------------------------------------------------------
# Scores and blends

def weighted_auc(y, score_of, w):
    """ROC AUC of images weighted by w; score_of: each image's index among the sorted distinct
    scores, so tied scores count half, as in roc_auc_score."""
    pos = np.bincount(score_of, weights=w * y)
    neg = np.bincount(score_of, weights=w * (1 - y))
    if not (pos.sum() and neg.sum()):
        return float("nan")
    return float((pos * (np.cumsum(neg) - neg / 2)).sum() / (pos.sum() * neg.sum()))


def auc(y, p):
    return weighted_auc(np.asarray(y, float), np.unique(p, return_inverse=True)[1], np.ones(len(y)))


def bootstrap_interval(y, p, groups, n=1000, seed=0):
    """95 % interval of the AUC when whole groups (patients, or images) are resampled with
    replacement: a resample weights each image by its group's count."""
    if not n:
        return [float("nan")] * 2
    codes = np.unique(groups, return_inverse=True)[1]
    score_of = np.unique(p, return_inverse=True)[1]
    draw, n_groups, y = np.random.default_rng(seed), codes.max() + 1, np.asarray(y, float)
    scores = []
    for _ in range(n):
        counts = np.bincount(draw.integers(0, n_groups, n_groups), minlength=n_groups)
        scores.append(weighted_auc(y, score_of, counts[codes]))
    return [float(q) for q in np.nanpercentile(scores, [2.5, 97.5])]


def to_rank(p):
    """Percentile ranks in (0, 1]: the order is all that AUC sees."""
    return pd.Series(p).rank().to_numpy() / len(p)


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def rescale(p):
    return (p - p.min()) / (p.max() - p.min()) if p.max() > p.min() else np.full_like(p, 0.5)


def fit_weights(X, y, steps=25):
    """Non-negative weights summing to 1 that maximise OOF AUC: greedy forward selection with
    replacement (Caruana et al., 2004), starting from the best single model."""
    counts = np.zeros(X.shape[1])
    for _ in range(steps):
        trials = [auc(y, X @ (counts + np.eye(X.shape[1])[j])) for j in range(X.shape[1])]
        counts[int(np.argmax(trials))] += 1
    return counts / counts.sum()


def fit(method, X, y):
    """The blend of `method` fitted on OOF predictions X (images x models): (function of such a
    matrix, its fitted weights or coefficients or None)."""
    if method == "mean":
        return (lambda Z: Z.mean(axis=1)), None
    if method == "rank":
        return (lambda Z: rescale(np.column_stack([to_rank(z) for z in Z.T]).mean(axis=1))), None
    if method == "weighted":
        w = fit_weights(X, y)
        return (lambda Z: Z @ w), w.tolist()
    # imported here: a second of start-up for every other method otherwise
    from sklearn.linear_model import LogisticRegression
    stack = LogisticRegression(C=1.0).fit(logit(X), y)
    return (lambda Z: stack.predict_proba(logit(Z))[:, 1]), stack.coef_[0].tolist()


def nested_oof(method, X, y, folds):
    """Each fold predicted by the blend fitted on the other folds."""
    out = np.empty(len(y))
    for k in np.unique(folds):
        held = folds == k
        out[held] = fit(method, X[~held], y[~held])[0](X[held])
    return out


# ------------------------------------------------------------------------------------------------
# Report

def oof_truth(models):
    """{image: target} over all OOF files, refusing models that disagree on a target."""
    truth = {}
    for m in models:
        for img, t in zip(m.oof.index, m.oof["target"]):
            if truth.setdefault(img, t) != t:
                raise DataError(f"model {m.name}: target of {img} disagrees with another "
                                "model's OOF")
    return truth


def shared_oof(models):
    """The images whose OOF all `models` cover, sorted."""
    return sorted(set.intersection(*(set(m.oof.index) for m in models))) if models else []


def build_report(models, method, patients, n_boot, seed, patients_from=None, notes=()):
    names = list(models)
    with_oof = [m for m in models.values() if m.oof is not None]
    if method in ("weighted", "stack") and len(with_oof) < len(names):
        raise DataError(f"--method {method} fits on OOF predictions, and model(s) "
                        f"{', '.join(n for n in names if models[n].oof is None)} have none")
    report = dict(method=method, models={}, notes=list(notes))
    truth = oof_truth(with_oof)
    group_of = patients
    if group_of is not None and not set(truth) <= set(group_of.index):
        report["notes"].append(f"some OOF images have no patient_id ({patients_from}): "
                               "intervals resample images")
        group_of = None
    if group_of is None and truth:
        report["notes"].append("intervals from a bootstrap over images (no patient ids): too "
                               "narrow, since one patient's images are correlated")
    report["bootstrap_over"] = "patients" if group_of is not None else "images"
    report["patient_ids"] = patients_from if group_of is not None else None

    def score(y, p, index):
        groups = group_of.loc[index].to_numpy() if group_of is not None else np.arange(len(y))
        return dict(auc=auc(y, p), ci95=bootstrap_interval(y, p, groups, n_boot, seed))

    for m in models.values():
        entry = dict(files=m.files, n_test=len(m.test))
        if m.oof is not None:
            entry.update(folds=sorted(int(k) for k in m.oof["fold"].unique()), n_oof=len(m.oof),
                         **score(m.oof["target"].to_numpy(), m.oof["pred"].to_numpy(), m.oof.index))
        report["models"][m.name] = entry
    common = shared_oof(with_oof)
    if common and any(len(m.oof) != len(common) for m in with_oof):
        report["notes"].append(f"models cover different OOF images: correlations and ensembles use "
                               f"the {len(common)} images all of them cover")
    shared_targets = set(with_oof[0].oof.loc[common, "target"]) if with_oof else set()
    unscored = ("some models have no OOF" if len(with_oof) < len(names) else
                "the models share no OOF images" if not common else
                "the shared OOF images hold one class" if len(shared_targets) < 2 else None)
    if method in ("weighted", "stack") and unscored:
        raise DataError(f"--method {method} fits on OOF predictions, and {unscored}")
    if with_oof:
        report["ensemble"] = {k: dict(auc=None, note=f"not scored: {unscored}") for k in METHODS}
    if unscored:
        cols, X = names, test_matrix(models)
        report["correlation_on"] = f"test predictions of {len(X)} images ({unscored})"
        if not all(m.test_file for m in models.values()):
            report["correlation_on"] = f"no images ({unscored}, and some have no test predictions)"
    else:
        cols = [m.name for m in with_oof]
        X = np.column_stack([m.oof.loc[common, "pred"].to_numpy() for m in with_oof])
        y, folds = (with_oof[0].oof.loc[common, c].to_numpy() for c in ("target", "fold"))
        report["correlation_on"] = f"OOF predictions of {len(common)} images"
        probabilities = all(in_unit_interval(m) for m in models.values())
        for k in METHODS:
            nested = k in ("weighted", "stack")
            why = not_scored(k, probabilities, y, folds)
            if why:
                report["ensemble"][k]["note"] = f"not scored: {why}"
                continue
            blend, weights = fit(k, X, y)
            p = nested_oof(k, X, y, folds) if nested else blend(X)
            report["ensemble"][k] = dict(**score(y, p, common), nested=nested, weights=weights)
    frame = pd.DataFrame(X, columns=cols)
    report["pearson"] = frame.corr("pearson").round(4).to_dict()
    report["spearman"] = frame.corr("spearman").round(4).to_dict()
    return report


def not_scored(method, probabilities, y, folds):
    """Why `method` gets no ensemble CV on these OOF targets and folds, or None."""
    nested = method in ("weighted", "stack")
    if method in PROBABILITY_METHODS and not probabilities:
        return "predictions outside [0, 1], which only rank takes"
    if nested and len(set(folds)) < 2:
        return "nested CV needs OOF of 2 or more folds"
    if nested and any(len(set(y[folds != k])) < 2 for k in set(folds)):
        return "nested CV needs both classes outside each fold"
    return None


def in_unit_interval(model):
    """Whether all the model's predictions are probabilities."""
    preds = [model.test] + ([model.oof["pred"]] if model.oof is not None else [])
    return all(p.between(0, 1).all() for p in preds)


def test_matrix(models):
    """Test predictions (images x models), in the first model's order; no rows if one has none."""
    if not all(m.test_file for m in models.values()):
        return np.zeros((0, len(models)))
    order = next(iter(models.values())).order
    return np.column_stack([m.test.loc[order].to_numpy() for m in models.values()])


def blend_test(models, method):
    """Submission rows in the first model's test order, fitted on all OOF."""
    if method in ("weighted", "stack"):
        common = shared_oof(list(models.values()))
        X = np.column_stack([m.oof.loc[common, "pred"].to_numpy() for m in models.values()])
        blend = fit(method, X, next(iter(models.values())).oof.loc[common, "target"].to_numpy())[0]
    else:
        blend = fit(method, None, None)[0]
    order = next(iter(models.values())).order
    return pd.DataFrame(dict(image_name=order, target=blend(test_matrix(models))))


def format_report(r):
    def ci(e):
        if e.get("auc") is None:
            return "n/a"
        return f"{e['auc']:.4f}  [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}]"

    width = max([len(n) for n in r["models"]] + [8])
    lines = [f"{'model':<{width}}  {'folds':<11} {'OOF':>6}  CV AUC  "
             f"95 % interval ({r['bootstrap_over']})"]
    for n, e in r["models"].items():
        folds = ",".join(map(str, e["folds"])) if "folds" in e else "-"
        score = ci(e) if "auc" in e else "no OOF (test only)"
        lines.append(f"{n:<{width}}  {folds:<11} {e.get('n_oof', 0):>6}  {score}")
    cols = list(r["pearson"])
    lines.append(f"\ncorrelation, Pearson / Spearman, on {r['correlation_on']}")
    lines.append(" " * width + "".join(f"  {c[:13]:>13}" for c in cols))
    for a in cols:
        pairs = (f"  {r['pearson'][a][b]:>6.3f}/{r['spearman'][a][b]:<6.3f}" for b in cols)
        lines.append(f"{a:<{width}}" + "".join(pairs))
    if "ensemble" in r:
        lines.append("\nensemble CV AUC (weighted and stack: nested, fitted on the other folds)")
        for m, e in r["ensemble"].items():
            mark = "*" if m == r["method"] else " "
            kind = "coefficients" if m == "stack" else "weights"
            weights = ", ".join(f"{w:.3f}" for w in e.get("weights") or [])
            weights = f"{kind} {weights}" if weights else ""
            lines.append(f"{mark} {m:<9} {ci(e)}  {e.get('note') or weights}")
    lines += [r["patient_ids"]] if r["patient_ids"] else []
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(line.rstrip() for line in lines)


def plot_correlation(report):
    """The models' Pearson correlations as a PNG heat map, each cell annotated: its bytes,
    drawn before any output is written."""
    # imported here: half a second of start-up otherwise. A bare Figure draws with Agg and needs
    # neither pyplot nor a display.
    from matplotlib.figure import Figure
    names = list(report["pearson"])
    labels = [n.replace("$", r"\$") for n in names]  # a name is text, never math
    corr = np.array([[report["pearson"][a][b] for b in names] for a in names], float)
    side = 3 + 0.8 * len(names)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels)
    for (i, j), c in np.ndenumerate(corr):
        ax.text(j, i, "n/a" if np.isnan(c) else f"{c:.3f}", ha="center", va="center",
                color="white" if abs(c) > 0.7 else "black")
    fig.colorbar(image, ax=ax, label="Pearson correlation")
    ax.set_title(f"Pearson correlation of the models\non {report['correlation_on']}", fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


@functools.cache
def new_file_mode():
    """The permission bits open(path, "w") gives a new file under the current umask."""
    umask = os.umask(0)  # the umask can only be read by setting it: restored at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    atomic_write_all({path: write})


def atomic_write_all(writes):
    """Call write(tmp) for each {path: write}, then rename every tmp into place: a crash or a full
    disk leaves the old files or all the new ones, with the permission bits of open(path, "w"),
    not mkstemp's 0600. A failed write is a DataError naming the file and what was replaced."""
    temps = {}
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                               suffix=".tmp")
            os.close(fd)
            write(temps[path])
            os.chmod(temps[path], new_file_mode())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:  # what writing raises (the writers write through Python), nothing else
        replaced = [str(p) for p, tmp in temps.items() if not os.path.exists(tmp)]
        said = f"; {', '.join(replaced)} replaced already" if replaced else "; nothing was replaced"
        raise DataError(f"{path}: cannot write it ({e.strerror or e}){said}") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def finite(x):
    """x with NaN and infinities as None, all the way down: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# melanoma.py's files that preds/*.csv matches and that hold no predictions, by their header
NOT_PREDICTIONS = {",".join(LEDGER[:3]): "melanoma.py's ledger of runs",
                   "step,lr,loss": "melanoma.py's LR range test"}


def predictions_only(files):
    """The files less melanoma.py's ledger and LR range tests, each left out with a note (known by
    the header, after a byte-order mark as Excel writes it). A file that holds OOF predictions
    must be named as one: a renamed copy (A_fold0_oof (1).csv) would be read as a submission."""
    kept = []
    for f in files:
        header = []
        if Path(f).is_file():
            with open(f, encoding="utf-8-sig", errors="replace") as fh:
                header = next(csv.reader([fh.readline()]), [])  # quoted names too (R's write.csv)
        what = next((w for start, w in NOT_PREDICTIONS.items()
                     if ",".join(header).startswith(start)), None)
        m = NAME.match(Path(f).name)
        if what:
            print(f"left out {f}: {what}, not predictions")
        elif {"pred", "fold"} <= set(header) and not (m and m["kind"] == "oof"):
            raise DataError(f"{f}: holds OOF predictions (columns pred, fold) but is not named "
                            "{name}_fold{k}_oof.csv (a renamed copy?): rename it")
        elif not m and re.match(r".+_fold\d+_(oof|test)\b", Path(f).name, re.I):
            raise DataError(f"{f}: named like a run's prediction file but not as one "
                            "({name}_fold{k}_test.csv; a renamed copy?): rename it")
        else:
            kept.append(f)
    if not kept:
        raise DataError("no prediction files among the inputs, only melanoma.py's ledger or LR "
                        "range tests")
    return kept


# ------------------------------------------------------------------------------------------------
# Shared with melanoma.py: text flags and output locations

def text(value):
    """An argparse type that refuses an empty value: an unset shell variable."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a value")
    try:  # undecodable bytes of a file name: they would fail only when first written
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {value!r}")
    return value


def check_writable(path, flag, folder=True):
    """Refuse an output location before anything is written: a file where a folder is
    expected (or the reverse), or a place where files cannot be created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise DataError(f"{flag} {path}: a {'file' if folder else 'folder'}, "
                        f"not a {'folder' if folder else 'file'}")
    if path.exists() and not folder and not path.is_file():  # /dev/null: the rename replaces it
        raise DataError(f"{flag} {path}: not a regular file")
    if path.is_symlink() and not path.exists():  # makedirs and open would fail later
        raise DataError(f"{flag} {path}: a link to nowhere")
    nearest = path if folder else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise DataError(f"{flag} {path}: {nearest} is a file, not a folder")
    try:  # os.access says yes on a read-only mount
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write in {nearest} ({e.strerror or e})")


# ------------------------------------------------------------------------------------------------
# melanoma.py's ledger: a row per finished fold, and --runs, its experiments compared

def append_run(path, row):
    """Append `row` to the ledger, with a header in a new file. Folds that finish at the same
    moment each append: a lock around the size check and the write keeps the header single and
    the lines whole; a rewrite through atomic_write would lose a row written in between."""
    import fcntl  # here: ensemble.py itself runs where there is none (Windows)
    buf = io.StringIO()
    csv.DictWriter(buf, LEDGER, lineterminator="\n").writerow(row)
    try:
        with open(path, "a+b", buffering=0) as f:  # unbuffered: each write lands or fails here
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            end = f.seek(0, os.SEEK_END)
            f.seek(max(end - 1, 0))  # an edited ledger's last row may lack its newline
            start = "" if end and f.read(1) == b"\n" else "\n" if end else ",".join(LEDGER) + "\n"
            data = (start + buf.getvalue()).encode()
            try:
                if f.write(data) != len(data):
                    raise OSError(28, "No space left on device")
            except OSError:
                f.truncate(end)  # as it was: half a row would stop every later run
                raise
    except OSError as e:
        raise DataError(f"{path}: cannot append to the ledger ({e.strerror or e})")


def read_ledger(path):
    runs = read_csv(path, LEDGER, "ledger", dict(
        fold="a whole number", **dict.fromkeys(("oof_auc", "oof_auc_no_tta", "wall_s"),
                                                "a finite number or empty")))
    where = f"ledger {path}"
    check_names(runs, where, "name", unique=False)
    for c in ("date", "out"):  # a row cut short (an edited or damaged ledger) lacks them
        refuse_rows(where, runs[c].str.strip() == "", runs[c], f"{c} is empty (a row cut short?)")
    refuse_rows(where, ~runs["settings"].map(splits), runs["settings"],
                "settings {value!r} are not a command line (an unbalanced quote?)")
    return runs


def splits(command):
    try:
        shlex.split(command)
        return True
    except ValueError:
        return False


def summarise_runs(runs, folder):
    """One row per name (its latest row per fold): the folds, the AUC that ranks it (the CV AUC
    over the concatenated OOF files in `folder` for several folds, else the fold's OOF AUC),
    the mean per-fold OOF AUC with and without TTA, the total wall time; best first."""
    latest, rows = runs.drop_duplicates(["name", "fold"], keep="last"), []
    for name, g in latest.groupby("name", sort=False):
        g = g.sort_values("fold")
        files = [Path(folder) / f"{name}_fold{k}_oof.csv" for k in g["fold"]]
        cv = g["oof_auc"].iloc[0] if len(g) == 1 else concatenated_auc(files)
        rows.append(dict(name=name, folds=",".join(map(str, g["fold"])), auc=cv,
                         mean_fold_auc=g["oof_auc"].mean(), no_tta=g["oof_auc_no_tta"].mean(),
                         wall_s=g["wall_s"].sum(), last=g["date"].max(),
                         settings=g["settings"].iloc[-1], out=g["out"].iloc[-1]))
    table = pd.DataFrame(rows)
    return table.sort_values("auc", ascending=False, na_position="last", kind="stable")


def concatenated_auc(files):
    """The AUC over OOF files concatenated; NaN when one is missing or not numbers."""
    if not all(f.is_file() for f in files):
        return math.nan
    oof = pd.concat([read_csv(f, ["target", "pred"], "OOF file") for f in files])
    y, p = (pd.to_numeric(oof[c], errors="coerce").to_numpy() for c in ("target", "pred"))
    return auc(y, p) if np.isfinite(p).all() and np.isin(y, [0, 1]).all() else math.nan


def rerun_command(name, settings, folds, out, size=512):
    """The command that trains `name` again at `size` px on the same folds, each fold from the
    same fold's weights, at the recipe's full scale: --frac and --epochs go (a small run's share
    and budget), and --weights, since --init-from replaces it."""
    tokens, kept, i = shlex.split(settings), [], 0
    while i < len(tokens):
        if tokens[i] in ("--size", "--init-from", "--weights", "--frac", "--epochs"):
            i += 2
            continue
        kept.append(tokens[i])
        i += 1
    command = ["python", "melanoma.py", *kept, "--size", str(size), "--fold", *folds.split(","),
               "--name", f"{name}_{size}", "--init-from", name]
    if out != "preds":
        command += ["--out", out]
    return shlex.join(command)


def number(v, digits=4):
    return "n/a" if pd.isna(v) else f"{v:.{digits}f}"


# --runs' columns: summarise_runs' key, heading, format.
RUNS_COLUMNS = (("name", "name", str), ("folds", "folds", str), ("auc", "AUC", number),
                ("mean_fold_auc", "mean fold AUC", number), ("no_tta", "without TTA", number),
                ("wall_s", "wall s", lambda v: number(v, 0)), ("last", "last finished", str),
                ("settings", "settings", str))


def print_runs(folder):
    """melanoma.py --runs: the ledger's experiments, best first, and how to re-run each large."""
    folder = Path(folder)
    path = folder / LEDGER_FILE
    table = summarise_runs(read_ledger(path), folder)
    print(f"{path}: {len(table)} run name(s), best first; AUC: the CV AUC over the concatenated "
          "OOF of a name's folds (one fold: its OOF AUC)")
    cells = [[heading for _, heading, _ in RUNS_COLUMNS]]
    cells += [[show(r[k]) for k, _, show in RUNS_COLUMNS] for r in table.to_dict("records")]
    widths = [max(len(row[i]) for row in cells) for i in range(len(RUNS_COLUMNS))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if table["auc"].isna().any():
        print(f"n/a: an OOF file of the name is missing from {folder}, or holds one class")
    print("\nre-run at 512 px, each fold from the same fold's weights (drop --init-from to train "
          "afresh: a more diverse ensemble member):")
    for r in table.itertuples():
        print(f"  {rerun_command(r.name, r.settings, r.folds, r.out)}")


def main(argv=None):
    try:
        blend(get_args(argv))
        sys.stdout.flush()
    except DataError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # pandas' messages span lines
        sys.exit(2)
    except BrokenPipeError:  # the report went to a command that stopped reading it (head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def blend(args):
    """Check, read, score and blend, then write the submission, report and heat map together."""
    args.files = predictions_only(args.files)
    check_one_recipe(args.files)
    folds = choose_folds(args.folds, args.files)[0]
    inputs = args.files + ([folds] if folds else []) + run_files(args.files)
    check_outputs(args.out, inputs)
    models = load_models(args.files, args.method in PROBABILITY_METHODS)
    patients, patients_from, notes = find_patients(args.folds, args.files)
    report = build_report(models, args.method, patients, args.bootstrap, args.seed,
                          patients_from, notes)
    lacking = [m.name for m in models.values() if not m.test_file]
    submission = None if lacking else blend_test(models, args.method)
    heat_map_png = plot_correlation(report)
    out, report_path, heat_map = output_paths(args.out)
    report_json = json.dumps(finite(report), indent=1, allow_nan=False)
    writes = {report_path: lambda tmp: Path(tmp).write_text(report_json),
              heat_map: lambda tmp: Path(tmp).write_bytes(heat_map_png)}
    if submission is not None:
        writes[out] = lambda tmp: submission.to_csv(tmp, index=False)
    atomic_write_all(writes)  # all three or none: a full disk leaves no half of them
    print(format_report(report))  # after the writes: a reader that stops early (head) loses none
    if submission is None:
        print(f"no submission: model(s) {', '.join(lacking)} have no test predictions among the "
              "files ({name}_fold{k}_test.csv)")
    written = [] if submission is None else [f"{out} ({len(submission)} images, method "
                                             f"{args.method})"]
    print(f"wrote {', '.join(written + [str(report_path)])} and {heat_map}")

if __name__ == "__main__":
    main()
