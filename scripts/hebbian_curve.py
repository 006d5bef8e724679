"""Retrieval from a linear-attention (Hebbian) memory vs the number of stored pairs: docs/hebbian_capacity.png.

Run: .venv/bin/python scripts/hebbian_curve.py  (about a minute on 2 CPU cores). Prints a markdown table.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from attnlab.tasks import hebbian_capacity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
D_KS = (16, 64, 256)
PAIRS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TRIALS = 20


def main() -> None:
    fig, (ax_cos, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    print("| d_k | P | cosine (measured) | cosine (predicted) | NN accuracy | all pairs exact |")
    print("|---|---|---|---|---|---|")
    for d_k, color in zip(D_KS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        results = [hebbian_capacity(d_k, P, trials=TRIALS, seed=0) for P in PAIRS]
        for r in results:
            print(f"| {d_k} | {r.num_pairs} | {r.cosine:.4f} | {r.predicted_cosine:.4f} | {r.accuracy:.4f} | "
                  f"{r.exact_fraction:.2f} |")
        ax_cos.plot(PAIRS, [r.cosine for r in results], "o", color=color, label=f"measured, d_k={d_k}")
        ax_cos.plot(PAIRS, [r.predicted_cosine for r in results], "-", color=color, alpha=0.6,
                    label=f"1/sqrt(1+(P-1)/d_k), d_k={d_k}")
        ax_acc.plot(PAIRS, [r.accuracy for r in results], "o-", color=color, label=f"NN accuracy, d_k={d_k}")
        ax_acc.plot(PAIRS, [r.exact_fraction for r in results], "s--", color=color, alpha=0.5,
                    label=f"all pairs exact, d_k={d_k}")
        for ax in (ax_cos, ax_acc):
            ax.axvline(math.sqrt(d_k), color=color, ls=":", alpha=0.5)
    for ax, title in ((ax_cos, "retrieval cosine cos(M k_j, v_j)"),
                      (ax_acc, "nearest stored value is v_j (dotted: P = sqrt(d_k))")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stored pairs P")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Linear attention as a Hebbian memory (random unit keys/values, d_v = d_k, {TRIALS} trials)",
                 fontsize=11)
    fig.tight_layout()
    out = ROOT / "docs" / "hebbian_capacity.png"
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
