"""graphflow: multi-stream video analytics as a graph of Engines declared in JSON."""
from .channel import Stopped
from .detections import Detections
from .engine import Engine, EngineContext, Param
from .errors import GraphError, GraphflowError, ParamError
from .message import EOS, Message, StreamEnd

__all__ = ["Detections", "Engine", "EngineContext", "Param", "Stopped", "Message", "EOS", "StreamEnd", "GraphError",
           "GraphflowError", "ParamError"]
__version__ = "0.1.0"
