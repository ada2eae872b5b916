"""Graph documents: loading and checking a graph file, the loaded graph, the declared fields of each part, the
engine registry, restricted mode for untrusted graphs, and drawing a graph."""
from graphflow.graph.loader import build, load, parse_set
from graphflow.graph.model import EDGE, NODE, SETTINGS, TOP, Edge, Graph, Node

__all__ = ["EDGE", "NODE", "SETTINGS", "TOP", "Edge", "Graph", "Node", "build", "load", "parse_set"]
