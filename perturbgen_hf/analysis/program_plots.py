"""Plots of gene programs: activity over time (heatmap and curves) and a UMAP of the genes."""

from pathlib import Path

import numpy as np

from .gene_programs import GenePrograms


def plot_gene_programs(programs: GenePrograms, folder, num_changing: int = 4, label_genes=()) -> list[Path]:
    """
    Write `program_activity_heatmap.png`, `gene_umap.png` and `top_programs_over_time.png` to `folder`.

    Args:
        programs ([`GenePrograms`]). folder (`str` or `os.PathLike`): created if needed.
        num_changing (`int`, defaults to 4): programs shown over time (the most time-varying).
        label_genes (`Sequence[str]`): genes labelled on the UMAP besides the hub genes (symbols).

    Returns:
        `list[Path]` of the written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        _heatmap(programs, folder / "program_activity_heatmap.png", plt),
        _umap(programs, folder / "gene_umap.png", plt, label_genes),
        _curves(programs, folder / "top_programs_over_time.png", plt, num_changing),
    ]
    return paths


def _predicted_table(programs):
    table = programs.activity.dropna(subset=["predicted"]).pivot(
        index="program", columns="time_point", values="predicted"
    )
    times = programs.activity.dropna(subset=["predicted"]).drop_duplicates("time_point")
    table = table[list(times.sort_values("time_value")["time_point"])]
    return table.loc[list(programs.summary["program"])]


def _heatmap(programs, path, plt):
    table = _predicted_table(programs)
    # Each program's activity relative to its own mean over time: the heatmap shows change, the numbers the level.
    centred = table.to_numpy() - table.to_numpy().mean(axis=1, keepdims=True)
    limit = max(float(np.abs(centred).max()), 1e-6)
    height = 1.2 + 0.32 * len(table)
    figure, axis = plt.subplots(figsize=(3.6 + 1.1 * table.shape[1], height))
    image = axis.imshow(centred, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            colour = "white" if abs(centred[i, j]) > 0.6 * limit else "black"  # readable on the darkest cells
            axis.text(j, i, f"{table.iat[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    rows = programs.summary.set_index("program")
    labels = [f"{p} ({rows.loc[p, 'size']} genes; {rows.loc[p, 'hubs']})" for p in table.index]
    axis.set_yticks(range(len(table)), labels, fontsize=7)
    axis.set_xticks(range(table.shape[1]), table.columns)
    axis.set_xlabel("predicted time point")
    axis.set_title(
        "Program activity: mean predicted log1p CP10k\n(colour: change from the program's mean)", fontsize=9
    )
    figure.colorbar(image, ax=axis, label="activity - program mean")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _umap(programs, path, plt, label_genes):
    membership = programs.membership
    names = list(programs.summary["program"])
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    figure, axis = plt.subplots(figsize=(7.5, 6))
    for colour, program in zip(colours, names):
        part = membership[membership["program"] == program]
        axis.scatter(part["umap_1"], part["umap_2"], s=10, color=colour, label=f"{program} ({len(part)})")
    axis.set_xlabel("UMAP 1")
    axis.set_ylabel("UMAP 2")
    axis.set_title("Genes by their decoder embeddings, coloured by program (hub genes in bold)", fontsize=9)
    axis.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.tight_layout()  # before the labels: their boxes are measured in the final layout
    wanted = {g.upper() for g in label_genes}
    labelled = membership[membership["hub"] | membership["gene_symbol"].str.upper().isin(wanted)]
    _place_labels(figure, axis, labelled)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _place_labels(figure, axis, rows, step=9):
    """
    Label points (hub genes in bold) without overlapping texts: each label tries offsets above and below its point
    in turn and takes the first whose box overlaps no label placed before it (a leader line joins a moved label).
    """
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    placed = []
    offsets = [(3, 3)] + [(3, 3 + sign * step * k) for k in range(1, 12) for sign in (1, -1)]
    for row in rows.sort_values("hub", ascending=False).itertuples():
        for dx, dy in offsets:
            text = axis.annotate(
                row.gene_symbol,
                (row.umap_1, row.umap_2),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7,
                fontweight="bold" if row.hub else "normal",
                arrowprops=None if dy == 3 else {"arrowstyle": "-", "lw": 0.3, "color": "0.5"},
            )
            text.update_positions(renderer)  # the offset is applied at draw time otherwise
            box = Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
        else:  # nowhere free: keep the first position rather than drop the label
            text = axis.annotate(
                row.gene_symbol,
                (row.umap_1, row.umap_2),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=7,
                fontweight="bold" if row.hub else "normal",
            )
            placed.append(Text.get_window_extent(text, renderer))


def _curves(programs, path, plt, num_changing):
    chosen = programs.top_changing(num_changing)
    summary = programs.summary.set_index("program")
    figure, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.2), squeeze=False, sharey=True)
    for axis, program in zip(axes[0], chosen):
        part = programs.activity[programs.activity["program"] == program].sort_values("time_value")
        predicted = part.dropna(subset=["predicted"])
        axis.plot(predicted["time_value"], predicted["predicted"], "o-", label="predicted")
        observed = part.dropna(subset=["observed"])
        if len(observed):
            axis.plot(observed["time_value"], observed["observed"], "s--", color="grey", label="observed")
        axis.set_xticks(part["time_value"], part["time_point"], fontsize=8)
        hubs = summary.loc[program, "hubs"]
        axis.set_title(f"{program} ({summary.loc[program, 'size']} genes)\nhubs: {hubs}", fontsize=8)
        axis.set_xlabel("time point")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean log1p CP10k of the program's genes")
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Most time-varying programs", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
