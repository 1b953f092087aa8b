"""Frozen vs fine-tuned, same backbone, on real offline data (scikit-learn's digits).

Runs the real entry points one after another and compares them on the held-out test queries:

  1. `cbmir-synth --digits` writes the digits (1797 real 8x8 scans, upsampled to 28 px) in the
     MedMNIST npz layout: train 1077 / val 360 / test 360;
  2. `cbmir` scores each frozen backbone (test queries against the train database), random
     weights (`model.pretrained=false`: no weights can be downloaded here);
  3. `cbmir-finetune` fine-tunes it from the same seeded start, per model:objective:strategy
     (train split, checkpoint by val mAP@5; the test split is never read);
  4. `cbmir model=finetuned model.checkpoint=RUN_DIR/best.ckpt` scores each fine-tune;
  5. 95% percentile-bootstrap intervals over the test queries for mAP@5 and ACC@1, and a
     paired interval of the difference to the frozen start (same resampled queries).

Default runs: ResNet18 with supcon / triplet / classification (full), supcon last_block and
projection_head, and a projection head on frozen raw pixels (an informative frozen "backbone").
Writes results.md, results.json and results.png into --out and prints every command it ran
(also kept in --out/commands.log). Finished steps are reused: delete a run's folders to redo it.

  python scripts/finetune_digits.py --out runs/finetune_digits --epochs 15
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METRICS = ("map@5", "acc@1")


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run one command (its output goes to the console), append it to `log` with its time."""
    text = shlex.join(cmd)
    print(f"\n$ {text}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    seconds = time.perf_counter() - started
    with open(log, "a") as handle:
        handle.write(f"{text}   # {seconds:.0f} s\n")
    return seconds


def per_query(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "per_query.npz") as z:
        return {m: z[m].astype(np.float64) for m in METRICS}


def zscored_frozen(frozen_dir: Path) -> dict[str, np.ndarray]:
    """The frozen embeddings standardised with train statistics, then the same k-NN: does
    a fixed per-dimension standardisation alone (what a head's BatchNorm starts from) help?"""
    from cbmir.retrieval import evaluate_retrieval
    from cbmir.store import EmbeddingStore

    metrics = json.loads((frozen_dir / "metrics.json").read_text())
    store = EmbeddingStore(frozen_dir.parent / "store")
    q = store.load(Path(metrics["query_entry"]).name)
    db = store.load(Path(metrics["database_entry"]).name)
    mean, std = np.mean(db.embeddings, axis=0), np.std(db.embeddings, axis=0) + 1e-8
    result = evaluate_retrieval(
        ((q.embeddings - mean) / std).astype(np.float32),
        q.labels,
        ((db.embeddings - mean) / std).astype(np.float32),
        db.labels,
        k=5,
        return_per_query=True,
    )
    return {m: np.asarray(result["per_query"][m], dtype=np.float64) for m in METRICS}


def diagnose_frozen(frozen_dir: Path) -> dict[str, float]:
    """Why a frozen start is weak: how collinear its train features are (mean pairwise cosine),
    how many directions carry their variance, and what a linear probe on them reaches."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from cbmir.store import EmbeddingStore

    metrics = json.loads((frozen_dir / "metrics.json").read_text())
    db = EmbeddingStore(frozen_dir.parent / "store").load(Path(metrics["database_entry"]).name)
    feats = np.asarray(db.embeddings, dtype=np.float64)
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    var = np.linalg.svd(z, compute_uv=False) ** 2
    probe = LogisticRegression(max_iter=2000)
    return {
        "mean_pairwise_cosine": float((unit @ unit.T).mean()),
        "directions_over_0.1pct_variance": int((var / var.sum() > 1e-3).sum()),
        "dim": int(feats.shape[1]),
        "linear_probe_5fold_accuracy": float(
            cross_val_score(probe, z, db.labels[:, 0], cv=5).mean()
        ),
    }


def summarise(
    entries: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray] | None]],
    resamples: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per (label, values, baseline): mean and 95% CI per metric, and a paired 95% CI of
    (values - baseline) over the same resampled queries when there is a baseline."""
    from cbmir.retrieval.bootstrap import bootstrap_means

    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, values, baseline in entries:
        out[label] = {}
        for metric in METRICS:
            ref = values[metric] if baseline is None else baseline[metric]
            means = bootstrap_means(np.stack([values[metric], ref], axis=1), resamples, seed=0)
            lo, hi = np.quantile(means[:, 0], [0.025, 0.975])
            stats = {
                "mean": float(values[metric].mean()),
                "ci_low": float(lo),
                "ci_high": float(hi),
            }
            if baseline is not None:
                dlo, dhi = np.quantile(means[:, 0] - means[:, 1], [0.025, 0.975])
                stats.update(
                    diff=float(values[metric].mean() - ref.mean()),
                    diff_low=float(dlo),
                    diff_high=float(dhi),
                )
            out[label][metric] = stats
    return out


def table(stats: dict, extra: dict[str, dict]) -> str:
    head = (
        "| extractor | val mAP@5: start -> best (epoch) | test mAP@5 [95% CI] "
        "| vs its frozen start [95% CI] | test ACC@1 [95% CI] | vs its frozen start [95% CI] |\n"
        "|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, s in stats.items():
        cells = [name, extra.get(name, {}).get("val", "-")]
        for metric in METRICS:
            m = s[metric]
            cells.append(
                f"{100 * m['mean']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
            )
            cells.append(
                f"{100 * m['diff']:+.1f} [{100 * m['diff_low']:+.1f}, {100 * m['diff_high']:+.1f}]"
                if "diff" in m
                else "-"
            )
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def figure(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, axes = plt.subplots(
        1, len(METRICS), figsize=(11, 0.45 * len(names) + 1.6), sharey=True, squeeze=False
    )
    y = np.arange(len(names))[::-1]
    for ax, metric in zip(axes[0], METRICS, strict=True):
        for i, name in enumerate(names):
            m = stats[name][metric]
            mean, lo, hi = (100 * m[k] for k in ("mean", "ci_low", "ci_high"))
            color = "tab:blue" if name.startswith("fine-tuned") else "0.45"
            ax.errorbar(
                mean, y[i], xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=4
            )
        ax.set_xlabel(f"test {metric} (%), 95% bootstrap CI")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names)
    fig.suptitle("digits, 360 held-out test queries: frozen (grey) vs fine-tuned (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_digits"))
    parser.add_argument(
        "--runs",
        default="resnet18:supcon:full,resnet18:triplet:full,resnet18:classification:full,"
        "resnet18:supcon:last_block,resnet18:supcon:projection_head,pixels:supcon:projection_head",
        help="model:objective:strategy triples to fine-tune (models start from random weights)",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CBMIR_STORE": str(out / "store"),
        "CBMIR_LOG_DIR": str(out / "logs"),
        "HF_HUB_OFFLINE": "1",
    }
    bindir = Path(sys.executable).parent
    exe = {name: str(bindir / name) for name in ("cbmir", "cbmir-finetune", "cbmir-synth")}
    npz = out / "digits.npz"
    data = ["data=npz", f"data.path={npz}", "data.name=digits", "data.size=28"]
    quiet = [] if args.progress else ["trainer.enable_progress_bar=false"]
    log = out / "commands.log"  # every command run into --out, with its wall time
    triples = [tuple(t.split(":")) for t in args.runs.split(",")]

    # finished steps are reused: delete a run's folders to run it again
    if not npz.is_file():
        run([exe["cbmir-synth"], "--digits", str(npz)], env, log)
    frozen: dict[str, dict[str, np.ndarray]] = {}
    for model in dict.fromkeys(t[0] for t in triples):
        frozen_dir = out / f"frozen-{model}"
        if not (frozen_dir / "per_query.npz").is_file():
            run(
                [
                    exe["cbmir"],
                    *data,
                    f"model={model}",
                    "model.pretrained=false",
                    f"seed={args.seed}",
                    *quiet,
                    f"hydra.run.dir={frozen_dir}",
                ],
                env,
                log,
            )
        frozen[model] = per_query(frozen_dir)
    entries: dict[str, list] = {m: [(f"frozen {m}", frozen[m], None)] for m in frozen}
    extra: dict[str, dict] = {}
    for model, objective, strategy in triples:
        name = f"{model}-{objective}-{strategy}"
        ft_dir, eval_dir = out / f"ft-{name}", out / f"eval-{name}"
        if not (ft_dir / "finetune.json").is_file():
            run(
                [
                    exe["cbmir-finetune"],
                    *data,
                    f"model={model}",
                    "model.pretrained=false",
                    f"seed={args.seed}",
                    *quiet,
                    f"finetune.objective={objective}",
                    f"finetune.strategy={strategy}",
                    f"finetune.max_epochs={args.epochs}",
                    f"finetune.lr={args.lr}",
                    f"hydra.run.dir={ft_dir}",
                ],
                env,
                log,
            )
        summary = json.loads((ft_dir / "finetune.json").read_text())
        if not (eval_dir / "per_query.npz").is_file():
            run(
                [
                    exe["cbmir"],
                    *data,
                    "model=finetuned",
                    f"model.checkpoint={ft_dir / 'best.ckpt'}",
                    *quiet,
                    f"hydra.run.dir={eval_dir}",
                ],
                env,
                log,
            )
        label = f"fine-tuned {summary['name']}"
        entries[model].append((label, per_query(eval_dir), frozen[model]))
        start = (summary.get("start_val") or {}).get("val/map@5")
        extra[label] = {
            "val": f"{100 * start:.1f} -> {100 * summary['best_score']:.1f} "
            f"(epoch {summary['best_epoch']})",
            "summary": summary,
        }
    if "resnet18" in frozen:
        entries["resnet18"].insert(
            1,
            (
                "frozen resnet18, features z-scored",
                zscored_frozen(out / "frozen-resnet18"),
                frozen["resnet18"],
            ),
        )
    stats = summarise([e for group in entries.values() for e in group], args.resamples)
    diagnosis = {m: diagnose_frozen(out / f"frozen-{m}") for m in frozen if m != "pixels"}
    text = table(stats, extra)
    for model, d in diagnosis.items():
        text += (
            f"\nFrozen {model} train features: mean pairwise cosine "
            f"{d['mean_pairwise_cosine']:.3f}; {d['directions_over_0.1pct_variance']} of "
            f"{d['dim']} directions hold > 0.1 % of the (z-scored) variance; logistic-regression "
            f"probe, 5-fold on train: {100 * d['linear_probe_5fold_accuracy']:.1f} % accuracy.\n"
        )
    commands = log.read_text().splitlines()
    (out / "results.md").write_text(
        text + "\nCommands (wall time on this machine):\n\n```\n" + "\n".join(commands) + "\n```\n"
    )
    (out / "results.json").write_text(
        json.dumps(
            {"stats": stats, "runs": extra, "frozen_features": diagnosis, "commands": commands},
            indent=2,
        )
    )
    figure(stats, out / "results.png")
    print("\n" + text)
    print(f"wrote {out / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
