"""Render a Graph for people: a text tree, Graphviz DOT, or a PNG drawn with matplotlib."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import networkx as nx

from graphflow.graph.model import Graph


def _params(params: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) or "-"


def order(graph: Graph) -> list[str]:
    """Engine ids in data-flow order (sources first; feedback edges ignored), for tables and listings."""
    dag = nx.DiGraph([(e.src, e.dst) for e in graph.edges if not e.feedback])
    dag.add_nodes_from(graph.nodes)
    return list(nx.lexicographical_topological_sort(dag, key=list(graph.nodes).index))


def text(graph: Graph) -> str:
    """Engines in topological order with type, placement, ports, params and where their outputs go."""
    lines = [f"graph {graph.name!r} ({graph.file}): {len(graph.nodes)} engines, {len(graph.edges)} connections"]
    for eid in order(graph):
        n = graph.nodes[eid]
        lines.append(f"{eid} [{n.type}, {n.placement}]  in: {', '.join(n.cls.inputs) or '-'}  "
                     f"out: {', '.join(n.cls.outputs) or '-'}")
        lines.append(f"    params: {_params(n.params)}")
        for e in graph.edges:
            if e.src == eid:
                lines.append(f"    {e.src_port} ──{e.policy}/{e.capacity}──> {e.dst}.{e.dst_port}")
    return "\n".join(lines)


def dot(graph: Graph) -> str:
    """Graphviz DOT source of the graph (UTF-8: Graphviz reads no JSON \\u escapes)."""
    out = [f"digraph {json.dumps(graph.name)} {{", "  rankdir=LR; node [shape=box, fontname=Helvetica];"]
    groups: dict[str, list[str]] = {}  # engines sharing a process (placement process:NAME) are drawn boxed together
    for n in graph.nodes.values():
        label = f"{n.id}\\n{n.type} ({n.placement})\\n{_params(n.params)[:60]}"
        line = f"{json.dumps(n.id)} [label={json.dumps(label, ensure_ascii=False).replace(chr(92) * 2, chr(92))}];"
        if n.placement.startswith("process:"):
            groups.setdefault(n.placement, []).append(line)
        else:
            out.append(f"  {line}")
    for k, (group, lines) in enumerate(groups.items()):
        out.append(f"  subgraph cluster_{k} {{ label={json.dumps(group)}; style=rounded;")
        out += [f"    {line}" for line in lines]
        out.append("  }")
    for e in graph.edges:
        style = ", style=dashed" if e.feedback else ""
        out.append(f"  {json.dumps(e.src)} -> {json.dumps(e.dst)} "
                   f"[label={json.dumps(f'{e.src_port}→{e.dst_port} ({e.policy})', ensure_ascii=False)}{style}];")
    out.append("}")
    return "\n".join(out)


ASPECT = 2.0  # width over height the PNG's layout aims at: a long chain wraps into rows instead of one strip


FONT = 11  # points: an engine's label, readable at the PNG's 120 dpi


def wrap(layers: int, cell_w: float, band_h: float, aspect: float = ASPECT) -> int:
    """Layers per row that bring the drawing's width over height nearest `aspect` (each layer `cell_w` wide, each
    row `band_h` high): a 6-engine chain in 2 rows of 3 rather than a 6-wide strip."""
    return min(range(1, layers + 1), key=lambda cols: abs(math.log(cols * cell_w / (-(-layers // cols) * band_h)
                                                                   / aspect)))


def figure(graph: Graph) -> Any:
    """The graph drawn as a matplotlib Figure: layers in data-flow order left to right, wrapped into rows (`wrap`)
    read like text; each engine a box drawn around its own label (so the text always fits), layers spaced by the
    widest label, arrows from box edge to box edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = graph.nx()
    dag = nx.DiGraph([(u, v) for u, v, d in g.edges(data=True) if not d["feedback"]])
    dag.add_nodes_from(g.nodes)
    layers = [sorted(layer) for layer in nx.topological_generations(dag)]
    labels = {n: f"{n}\n{d['type']}\n({d['placement']})" for n, d in g.nodes(data=True)}
    width = max(len(line) for text in labels.values() for line in text.splitlines())  # characters
    step_x, step_y = 0.15 * width + 1.4, 1.2  # inches between layer centres / rows, from the label size
    tallest = max(len(layer) for layer in layers)
    band = step_y * tallest + 0.5  # one row of layers
    cols = wrap(len(layers), step_x, band)
    rows = -(-len(layers) // cols)
    fig_w = max(step_x * cols, 3.0)
    fig_h = max(band * rows + 0.3, 1.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=120)
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")
    boxes = {}
    for depth, layer in enumerate(layers):
        row, col = divmod(depth, cols)
        for k, node in enumerate(layer):
            x = step_x * (col + 0.5)
            y = fig_h - band * (row + 0.5) + step_y * ((len(layer) - 1) / 2 - k)
            boxes[node] = ax.text(x, y, labels[node], ha="center", va="center", fontsize=FONT, zorder=2,
                                  bbox={"boxstyle": "round,pad=0.4", "fc": "#dde8f6", "ec": "#4a6fa5"})
    for u, v, d in g.edges(data=True):  # drawn after the boxes (zorder), so they clip to the laid-out boxes
        ax.annotate("", xy=boxes[v].get_position(), xytext=boxes[u].get_position(), zorder=3,
                    arrowprops={"arrowstyle": "-|>", "color": "#333333", "shrinkA": 2, "shrinkB": 2,
                                "patchA": boxes[u].get_bbox_patch(), "patchB": boxes[v].get_bbox_patch(),
                                "linestyle": "--" if d["feedback"] else "-",
                                "connectionstyle": "arc3,rad=0.3" if d["feedback"] else "arc3"})
        (x0, y0), (x1, y1) = boxes[u].get_position(), boxes[v].get_position()
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, f"{d['src_port']}→{d['dst_port']}", ha="center",
                va="bottom", fontsize=FONT - 2, color="#333333", zorder=3)
    fig.suptitle(graph.name, fontsize=FONT + 1)
    return fig


def png(graph: Graph, path: str) -> None:
    """Draw the graph (see `figure`) and save it as a PNG image."""
    import matplotlib.pyplot as plt

    fig = figure(graph)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def default_png(graph: Graph) -> str:
    """Where a PNG goes without -o: the graph file's name with .png, in the current folder (demo.json → demo.png)."""
    return Path(graph.file).with_suffix(".png").name if graph.file else f"{graph.name}.png"


def render(graph: Graph, fmt: str, output: str | None) -> str | None:
    """Text or DOT as a string (or into `output`), PNG into `output` (`default_png` when none)."""
    if fmt == "png":
        png(graph, output or default_png(graph))
        return None
    body = text(graph) if fmt == "text" else dot(graph)
    if output:
        with open(output, "w") as f:
            f.write(body + "\n")
        return None
    return body
