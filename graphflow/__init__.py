"""graphflow: multi-stream video analytics as a graph of Engines declared in JSON."""
from .engine import Engine, Param
from .errors import GraphError, GraphflowError, ParamError
from .message import EOS, Message, StreamEnd

__all__ = ["Engine", "Param", "Message", "EOS", "StreamEnd", "GraphError", "GraphflowError", "ParamError"]
__version__ = "0.1.0"
