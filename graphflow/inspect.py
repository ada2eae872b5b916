"""Render a Graph for people: a text tree, Graphviz DOT, or a PNG drawn with matplotlib."""
from __future__ import annotations

import json

import networkx as nx

from .errors import GraphError
from .graph import Graph


def _params(params: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) or "-"


def text(graph: Graph) -> str:
    """Engines in topological order with type, placement, ports, params and where their outputs go."""
    g = graph.nx()
    order = list(nx.topological_sort(nx.DiGraph([(u, v) for u, v, d in g.edges(data=True) if not d["feedback"]])))
    order += [n for n in graph.nodes if n not in order]
    lines = [f"graph {graph.name!r} ({graph.file}): {len(graph.nodes)} engines, {len(graph.edges)} connections"]
    for eid in order:
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


def png(graph: Graph, path: str) -> None:
    """Draw the graph left to right with matplotlib and save it as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = graph.nx()
    layers = {}
    dag = nx.DiGraph([(u, v) for u, v, d in g.edges(data=True) if not d["feedback"]])
    dag.add_nodes_from(g.nodes)
    for depth, layer in enumerate(nx.topological_generations(dag)):
        for k, node in enumerate(sorted(layer)):
            layers[node] = (depth, -k)
    fig, ax = plt.subplots(figsize=(2.8 * (max(x for x, _ in layers.values()) + 1), 2.5))
    labels = {n: f"{n}\n{d['type']} ({d['placement']})" for n, d in g.nodes(data=True)}
    nx.draw_networkx_nodes(g, layers, ax=ax, node_shape="s", node_size=5200, node_color="#dde8f6")
    nx.draw_networkx_labels(g, layers, labels, ax=ax, font_size=8)
    nx.draw_networkx_edges(g, layers, ax=ax, node_size=5200, node_shape="s", arrows=True, arrowsize=15)
    edge_labels = {(u, v): f"{d['src_port']}→{d['dst_port']}" for u, v, d in g.edges(data=True)}
    nx.draw_networkx_edge_labels(g, layers, edge_labels, ax=ax, font_size=7)
    ax.set_title(graph.name)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(graph: Graph, fmt: str, output: str | None) -> str | None:
    """Text or DOT as a string (or into `output`), PNG into `output`."""
    if fmt == "png":
        if not output:
            raise GraphError(graph.file, "--output", "PNG needs -o FILE")
        png(graph, output)
        return None
    body = text(graph) if fmt == "text" else dot(graph)
    if output:
        with open(output, "w") as f:
            f.write(body + "\n")
        return None
    return body
