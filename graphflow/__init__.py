"""graphflow: multi-stream video analytics as a graph of Engines declared in JSON."""
from graphflow.detections import Detections
from graphflow.engine import Engine, EngineContext, Param
from graphflow.errors import GraphError, GraphflowError, ParamError
from graphflow.message import EOS, Message, StreamEnd
from graphflow.runtime.links import Stopped

__all__ = ["Detections", "Engine", "EngineContext", "Param", "Stopped", "Message", "EOS", "StreamEnd", "GraphError",
           "GraphflowError", "ParamError"]
__version__ = "0.1.0"
