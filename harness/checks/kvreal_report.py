"""KVREAL's per-layer presentation: the loss notes (which side and layers carry the attention error), the per-layer
tables and the plot of one analysis (harness/checks/kvreal.py ``analyse``'s dict).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.checks.kvreal_math import SIDES
from harness.report.model import Table

def loss_notes(A: dict) -> list[str]:
    """One line per type: which side and layers carry the attention error (fork path)."""
    out = []
    for t in A["types"]:
        rk, rv = A["res"].get(("fork", t, "K")), A["res"].get(("fork", t, "V"))
        if rk is None or rv is None:
            continue
        ek, evv = rk["attn_rel_err"] ** 2, rv["attn_rel_err"] ** 2
        tot = ek.sum() + evv.sum()
        share_k = ek.sum() / tot if tot > 0 else float("nan")
        both = [(e, "K", il) for e, il in zip(ek, A["layers"])] + [(e, "V", il) for e, il in zip(evv, A["layers"])]
        top = sorted(both, reverse=True)[:3]
        top_s = ", ".join(f"{s}{il} ({np.sqrt(e):.3g})" for e, s, il in top)
        alt = []
        for p, what in (("lloyd", "the Lloyd-Max table"), ("norot", "no rotation"), ("randrot", "random signs (median)")):
            if (p, t, "K") in A["res"] and (p, t, "V") in A["res"]:
                alt.append(f"{what} {A['res'][(p, t, 'K')]['nmse'].mean():.4g}/{A['res'][(p, t, 'V')]['nmse'].mean():.4g}")
        alt_s = f" (K/V mean NMSE with {', with '.join(alt)}: reference quantiser)" if alt else ""
        out.append(f"{t}: {'K' if share_k > 0.5 else 'V'} carries {max(share_k, 1 - share_k):.0%} of the summed squared "
                   f"attention-output error; worst layers {top_s}; mean NMSE K {rk['nmse'].mean():.4g}, V {rv['nmse'].mean():.4g}"
                   + alt_s)
    return out


def _num(x) -> float | None:
    """A table value: the float, or None when it is missing or not finite (rendered '-')."""
    return None if x is None or not np.isfinite(x) else float(x)


def per_layer_tables(A: dict, capture_info: dict | None = None, image: str = "") -> list[Table]:
    """Per-layer tables of one analysis: fork-path NMSE, attention error with one side quantised, K attention-logit
    error, and the vectors' statistics; the first carries the model description and the plot (``image``)."""
    L, res, types, lab = A["layers"], A["res"], A["types"], A["label"]
    about = []
    if capture_info:
        about.append(f"{capture_info.get('arch')} {capture_info.get('n_layer')} layers, n_head {capture_info.get('n_head')}, "
                     f"n_head_kv {capture_info.get('n_head_kv')}, head_dim {A['head_dim']} (stored {A['padded']}), "
                     f"{capture_info.get('n_tokens')} tokens; rotation: {A['rotation']}.")
    side_cols = ["layer"] + [f"{s} {t}" for s in SIDES for t in types]
    out = []
    for metric, title in (("nmse", "NMSE (fork path, real coordinates)"),
                          ("attn_rel_err", "attention-output relative error with only this side quantised (fork path)")):
        rows = [[il] + [_num(res[("fork", t, s)][metric][i]) if ("fork", t, s) in res else None
                        for s in SIDES for t in types] for i, il in enumerate(L)]
        out.append(Table(f"per_layer:{lab}:{metric}", f"KVREAL per layer, {lab}: {title}", side_cols, rows,
                         caption=about if not out else [], image=image if not out else ""))
    out.append(Table(f"per_layer:{lab}:logit_rel_err",
                     f"KVREAL per layer, {lab}: K attention-logit error rms(L_hat - L) / rms(L - row mean), causal pairs, "
                     "queries from the same capture (fork path)", ["layer"] + list(types),
                     [[il] + [_num(res[("fork", t, "K")]["logit_rel_err"][i]) if ("fork", t, "K") in res else None
                              for t in types] for i, il in enumerate(L)]))
    st = A["stats"]
    stat_keys = ("norm_mean", "chan_scale_max_over_median", "kurtosis_before", "kurtosis_after", "dc_fraction")
    stat_names = ("norm", "chan max/med", "kurt before", "kurt after", "dc")
    out.append(Table(f"per_layer:{lab}:stats", f"KVREAL per layer, {lab}: vector statistics",
                     ["layer"] + [f"{s} {n}" for s in SIDES for n in stat_names],
                     [[il] + [_num(st[s][m][i]) for s in SIDES for m in stat_keys] for i, il in enumerate(L)],
                     caption=["kurtosis of unit-row coordinates: 3 = Gaussian; dc = share of the energy in the mean "
                              "vector shared by all tokens"]))
    return out


def markdown_tables(A: dict, capture_info: dict | None = None) -> str:
    """The per-layer tables (:func:`per_layer_tables`) as Markdown."""
    from harness.report.render import table_markdown
    return "\n".join(ln for t in per_layer_tables(A, capture_info) for ln in table_markdown(t))


def plot(A: dict, path: Path) -> Path | None:
    """NMSE and attention error per layer, K and V, one line per type (fork solid, reference dotted)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colors = dict(zip(A["types"], ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:blue", "tab:brown"]))
    for col, side in enumerate(SIDES):
        for row, metric in enumerate(("nmse", "attn_rel_err")):
            ax = axes[row][col]
            for t in A["types"]:
                for p, ls in (("fork", "-"), ("ref", ":")):
                    r = A["res"].get((p, t, side))
                    if r is not None:
                        ax.plot(A["layers"], r[metric], ls, color=colors[t], marker="o" if p == "fork" else None, ms=3,
                                label=f"{t} ({p})" if (row, col) == (0, 0) else None)
            ax.set_yscale("log")
            ax.set_title(f"{side}: {'NMSE' if metric == 'nmse' else 'attention-output rel. error'}")
            ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"KVREAL {A['label']}: per-layer distortion on the model's own K/V")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
