"""Inference backends: each has `load(path)`, `input` (ModelInput) and `infer(batch [N,3,H,W] float32) -> np.ndarray`.

onnxruntime (CPU), torch (onnx2torch on a CUDA GPU, fp16) and tensorrt (unverified); GPU backends take CuPy batches
without a copy, and the torch backend decodes detections on the GPU with detect.py's arithmetic (`candidates`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from graphflow.media.models import ModelInput, describe_session, inspect_onnx, open_session
from graphflow.vision.detect import (
    DetectParams,
    Grid,
    anchor_boxes,
    batch_candidates,
    class_array,
    rows_of,
    score_rows,
    yolox_grid,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


class Backend(Protocol):
    """What the infer engine needs of a backend."""

    name: str
    input: ModelInput | None

    def load(self, path: Path) -> None: ...

    def infer(self, batch: Any) -> np.ndarray: ...


def _on_gpu(array: Any) -> bool:
    """True for arrays that live in CUDA memory (CuPy arrays, CUDA torch tensors)."""
    return hasattr(array, "__cuda_array_interface__")


def to_host(batch: Any) -> np.ndarray:
    """A batch as a C-contiguous float32 NumPy array, copied from the GPU when it lives there."""
    if _on_gpu(batch):
        import cupy

        batch = cupy.asnumpy(cupy.asarray(batch))
    return np.ascontiguousarray(batch, dtype=np.float32)


def stack_batch(tensors: Sequence[Any]) -> Any:
    """Stack 3xHxW tensors into one [N, 3, H, W] batch where they live: CuPy on the GPU if any is there, else NumPy."""
    if any(_on_gpu(t) for t in tensors):
        import cupy

        return cupy.stack([cupy.asarray(t) for t in tensors])
    return np.stack(tensors)


def _in_chunks(run: Callable[[Any], np.ndarray], batch: Any, size: int) -> np.ndarray:
    """`run` over slices of at most `size` images, outputs concatenated (for fixed-batch or size-capped engines)."""
    if len(batch) <= size:
        return run(batch)
    return np.concatenate([run(batch[i:i + size]) for i in range(0, len(batch), size)])


class OnnxRuntimeBackend:
    """Runs an ONNX model with onnxruntime; `gpu` asks for its CUDA provider (unverified: onnxruntime-gpu not run)."""

    name = "onnxruntime"

    def __init__(self, threads: int = 0, gpu: bool = False) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.gpu = gpu
        self.session = None
        self.input: ModelInput | None = None

    def providers(self) -> list[str]:
        """Execution providers to use: CUDA first when asked for and installed (onnxruntime-gpu), then CPU."""
        import onnxruntime as ort

        cuda = self.gpu and "CUDAExecutionProvider" in ort.get_available_providers()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]

    def load(self, path: Path) -> None:
        """Open a session; intra-op threads are capped so several engines can share a machine."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = open_session(Path(path), options, self.providers())
        self.input = describe_session(self.session, Path(path)).input
        log.info("loaded %s with %s", path, self.session.get_providers()[0])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: batch})[0]

    def infer(self, batch: Any) -> np.ndarray:
        """Run a [N, 3, H, W] float32 batch (NumPy, or GPU arrays copied to the host) and return the first output;
        a fixed-batch model runs image by image."""
        batch = to_host(batch)
        return _in_chunks(self._run, batch, len(batch) if self.input.dynamic_batch else 1)


def _require_torch_cuda(kind: str) -> Any:
    """The torch module when PyTorch is installed and sees a CUDA GPU; else ValueError naming the backend."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"backend {kind}: PyTorch with CUDA is not installed (pip install torch onnx2torch)") from None
    if not torch.cuda.is_available():
        raise ValueError(f"backend {kind}: PyTorch {torch.__version__} sees no CUDA GPU "
                         f"(CUDA build {torch.version.cuda or 'none'})")
    return torch


def _to_torch(batch: Any, torch: Any) -> Any:
    """A batch as a CUDA torch tensor: GPU arrays are shared through DLPack (no copy), NumPy is uploaded once."""
    if isinstance(batch, torch.Tensor):
        return batch.cuda()
    if _on_gpu(batch):
        return torch.from_dlpack(batch)
    return torch.from_numpy(np.require(batch, np.float32, ("C", "W"))).cuda()


HOST_READ_OPS = ("OnnxSlice", "OnnxResize", "OnnxReshape")  # onnx2torch ops that read their non-data inputs on the CPU


def powers_of_two(top: int) -> list[int]:
    """1, 2, 4, … up to the first power of two ≥ top."""
    return [1 << i for i in range((top - 1).bit_length() + 1)]


def keep_shape_constants_on_host(module: Any) -> int:
    """Move the constants that onnx2torch's Slice/Resize/Reshape read as Python values (bounds, scales, shapes) back
    to the CPU: left on the GPU, each read is a device-to-host sync per call, which also stops CUDA graph capture.
    Returns how many were moved."""
    moved = 0
    for node in module.graph.nodes:
        users = list(node.users)
        if node.op != "get_attr" or not users or not all(
                user.op == "call_module" and user.args[0] is not node
                and type(module.get_submodule(user.target)).__name__ in HOST_READ_OPS for user in users):
            continue
        owner, _, name = node.target.rpartition(".")
        holder = module.get_submodule(owner)
        buffers = dict(holder.named_buffers(recurse=False))
        if name in buffers:
            holder.register_buffer(name, buffers[name].cpu())
            moved += 1
    return moved


class TorchBackend:
    """Runs the ONNX model converted to PyTorch by onnx2torch on a CUDA GPU, in fp16 by default; takes NumPy, CuPy
    or torch batches (GPU ones without a copy) and returns a float32 NumPy output.

    Batches run on the backend's own CUDA stream. With `cuda_graphs` each batch is padded to the next power of two
    and replayed from a CUDA graph recorded once per size (those up to `max_batch` at load): the converted model is
    hundreds of small kernels, so launching them one by one bounds small batches. `candidates` also replays the
    decode from a recorded graph (one per size and detection settings), so a batch costs the host two launches and
    one copy back, not a launch per operation: each launch takes the GIL, which the engine's other threads hold.

    Every run is bracketed by CUDA events; `device_span()` gives the calling thread's last run as GPU-side start and
    end times on the host's monotonic clock, so busy time is what the GPU did, not how long the host waited."""

    name = "torch"
    top_k = 512  # candidates per image a recorded decode fetches; an image with more takes the exact path

    def __init__(self, half: bool = True, cuda_graphs: bool = True, max_batch: int = 1) -> None:
        self.torch = _require_torch_cuda(self.name)
        try:
            import onnx2torch
        except ImportError:
            raise ValueError(f"backend {self.name}: onnx2torch is not installed (pip install onnx2torch)") from None
        self.convert = onnx2torch.convert
        self.dtype = self.torch.float16 if half else self.torch.float32
        self.cuda_graphs = cuda_graphs
        self.max_batch = max_batch
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.decoders: dict[tuple, tuple[Any, Any] | None] = {}  # (size, format, conf, classes) → (top rows, graph)
        self.grids: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per calling thread: the CUDA events of its last run
        self._epoch: tuple[Any, float] | None = None  # an event and the host's monotonic time when it happened
        self.model = None
        self.stream = None
        self.input: ModelInput | None = None

    def load(self, path: Path) -> None:
        """Convert the ONNX graph to a torch module on the GPU and run each power-of-two batch size up to max_batch
        once, so cuDNN picks its kernels and CUDA graphs are recorded before any other thread uses the GPU."""
        import onnx

        self.input = inspect_onnx(Path(path)).input
        try:
            module = self.convert(onnx.load(str(path)))
        except Exception as exc:  # onnx2torch raises NotImplementedError and others on unsupported ops
            raise ValueError(f"model {path}: onnx2torch cannot convert it ({str(exc).splitlines()[0]})") from None
        self.model = module.eval().to("cuda", self.dtype)
        self.stream = self.torch.cuda.Stream()
        keep_shape_constants_on_host(self.model)
        self.torch.backends.cudnn.benchmark = True
        width, height = self.input.size
        for size in powers_of_two(self.max_batch):
            self.infer(np.zeros((size, 3, height, width), np.float32))
        epoch = self.torch.cuda.Event(enable_timing=True)
        epoch.record(self.stream)
        epoch.synchronize()
        self._epoch = (epoch, time.monotonic())
        log.info("loaded %s with torch %s on %s (%s%s)", path, self.torch.__version__, self.torch.cuda.get_device_name(),
                 str(self.dtype).removeprefix("torch."), ", CUDA graphs" if self.cuda_graphs else "")

    def prepare(self, batch: Any) -> Any:
        """The batch on the GPU in the model's dtype (the infer engine uploads batch k+1 while batch k runs)."""
        return _to_torch(batch, self.torch).to(self.dtype)

    def _eager(self, x: Any) -> Any:
        output = self.model(x)
        return output[0] if isinstance(output, (tuple, list)) else output

    def _capture(self, size: int) -> tuple[Any, Any, Any]:
        """Record the forward pass of a `size` batch as a CUDA graph: (static input, static output, graph)."""
        torch = self.torch
        width, height = self.input.size
        static_in = torch.zeros((size, 3, height, width), dtype=self.dtype, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                self._eager(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may upload meanwhile
            static_out = self._eager(static_in)
        return static_in, static_out, graph

    def forward(self, x: Any) -> Any:
        """The first output of a prepared batch, left on the GPU (valid until the next call)."""
        if not self.cuda_graphs:
            return self._eager(x)
        count = len(x)
        size = powers_of_two(count)[-1]
        if size not in self.graphs:
            try:
                self.graphs[size] = self._capture(size)
            except Exception as exc:  # an op that cannot be captured: run eagerly from now on
                log.warning("torch backend: CUDA graph capture failed (%s); running eagerly", exc)
                self.cuda_graphs = False
                return self._eager(x)
        static_in, static_out, graph = self.graphs[size]
        static_in[:count].copy_(x)
        graph.replay()
        return static_out[:count]

    def _output(self, batch: Any) -> Any:
        """The float32 output of a batch, computed on the model's own stream (call inside `torch.cuda.stream(
        self.stream)`). That stream does not block the legacy default stream, so host-to-device copies that other
        threads make there (CuPy uploads in preprocess) do not wait behind a running batch."""
        torch = self.torch
        x = self.prepare(batch)  # on the caller's stream
        self.stream.wait_stream(torch.cuda.default_stream())
        self.stream.wait_stream(torch.cuda.current_stream())  # x stays alive: callers copy the output to the host
        with torch.cuda.stream(self.stream), self._lock:
            start = self._event()
            output = self.forward(x).float()  # a copy: the graph's output buffer is free for the next batch
            self._local.span = (start, self._event())
            return output

    def _event(self) -> Any:
        """A timing event recorded now on the current stream."""
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def device_span(self) -> tuple[float, float] | None:
        """GPU-side (start, end) of this thread's last model run, in `time.monotonic()` seconds (None before one):
        its kernels ran within it (the copy back of a whole raw output is not in it)."""
        span, self._local.span = getattr(self._local, "span", None), None
        if span is None or self._epoch is None:
            return None
        start, end = span
        end.synchronize()
        epoch, at = self._epoch
        return at + epoch.elapsed_time(start) / 1e3, at + epoch.elapsed_time(end) / 1e3

    def infer(self, batch: Any) -> np.ndarray:
        """Run a [N, 3, H, W] batch (prepared or not) and return the first output as float32 NumPy. Callers in
        several threads take turns: the recorded graphs share their input and output buffers."""
        with self.torch.inference_mode():
            output = self._output(batch)
            with self.torch.cuda.stream(self.stream):
                return output.cpu().numpy()

    def candidates(self, batch: Any, fmt: str, p: DetectParams) -> list[np.ndarray]:
        """Run a batch and decode it on the GPU: per image the [k, 6] candidates over `p.conf` and in `p.classes`
        (x1, y1, x2, y2 in model-input pixels, score, class id, in anchor order), fetched in one small copy instead
        of the whole raw output; NMS is left to detect.finish_candidates on the host."""
        torch = self.torch
        with torch.inference_mode():
            if not self.cuda_graphs:
                output = self._output(batch)
                with torch.cuda.stream(self.stream):
                    return gpu_candidates(output, fmt, self.input.size, p, self._grid)
            x = self.prepare(batch)
            self.stream.wait_stream(torch.cuda.default_stream())
            if torch.cuda.current_stream() != torch.cuda.default_stream():
                self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                with self._lock:
                    start = self._event()
                    raw = self.forward(x)  # the forward graph's output buffer: valid while the lock is held
                    decoder = self._decoder(powers_of_two(len(x))[-1], fmt, p)
                    if decoder is None:
                        output = raw.float()  # a copy: the buffer is free for the next batch
                        self._local.span = (start, self._event())
                    else:
                        top, graph = decoder
                        graph.replay()
                        top = top[:len(x)].clone()  # likewise
                        self._local.span = (start, self._event())
                if decoder is None:
                    return gpu_candidates(output, fmt, self.input.size, p, self._grid)
                found = split_top_candidates(top.cpu().numpy())  # the host waits here, the lock free meanwhile
            if found is not None:
                return found
            output = self._output(x)  # an image with top_k candidates or more: rerun it, count them all (rare)
            with torch.cuda.stream(self.stream):
                return gpu_candidates(output, fmt, self.input.size, p, self._grid)

    def _decoder(self, size: int, fmt: str, p: DetectParams) -> tuple[Any, Any] | None:
        """The recorded decode of the forward graph's `size` output: (top rows [size, K, 7], graph), recorded at
        first use; None (decode eagerly) when it cannot be recorded. Call under the lock, on the model's stream."""
        key = (size, fmt, p.conf, p.classes)
        if key in self.decoders:
            return self.decoders[key]
        if size not in self.graphs:  # the forward pass could not be recorded: it ran eagerly
            return None
        torch = self.torch
        _, static_out, _ = self.graphs[size]
        classes = class_array(p, torch, device="cuda")
        self._grid(self.input.size)  # uploaded before recording

        def decode() -> Any:
            rows = rows_of(static_out.float(), fmt, torch)
            class_ids, scores, keep = score_rows(rows, fmt, p.conf, classes, torch)
            best, anchor = torch.where(keep, scores, -1.0).topk(min(self.top_k, rows.shape[1]), dim=1)
            raw = rows[..., :4].gather(1, anchor[..., None].expand(-1, -1, 4))
            boxes = anchor_boxes(raw, anchor, fmt, self.input.size, rows.shape[1], torch, self._grid)
            return torch.cat([boxes, best[..., None], class_ids.gather(1, anchor)[..., None].float(),
                              anchor[..., None].float()], dim=2)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                decode()  # warm-up off the capturing stream
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                top = decode()
            self.decoders[key] = (top, graph)
        except Exception as exc:  # an op that cannot be recorded: decode eagerly for these settings
            log.warning("torch backend: recording the decode failed (%s); decoding eagerly", exc)
            self.decoders[key] = None
        return self.decoders[key]

    def _grid(self, size: tuple[int, int]) -> tuple[Any, Any]:
        """detect.yolox_grid's cells and strides as CUDA tensors, uploaded once per input size."""
        if size not in self.grids:
            self.grids[size] = tuple(self.torch.from_numpy(a.copy()).cuda() for a in yolox_grid(*size))
        return self.grids[size]


def gpu_candidates(output: Any, fmt: str, input_size: tuple[int, int], p: DetectParams, grid: Grid) -> list[np.ndarray]:
    """A float32 CUDA output batch [N, A, K] (YOLOX, v5) or [N, K, A] (v8) to per-image [k, 6] NumPy candidates
    through detect.batch_candidates (threshold, class filter and box decode on the GPU), the kept rows copied to the
    host at once (the exact path: as many rows as pass, one sync to count them)."""
    import torch

    classes = class_array(p, torch, device=output.device)
    image, boxes, scores, class_ids = batch_candidates(output, fmt, input_size, p, torch, grid, classes)
    packed = torch.cat([image[:, None].float(), boxes, scores[:, None], class_ids[:, None].float()],
                       dim=1).cpu().numpy()
    counts = np.bincount(packed[:, 0].astype(np.int64), minlength=len(output))
    return np.split(packed[:, 1:], np.cumsum(counts)[:-1])


def split_top_candidates(top: np.ndarray) -> list[np.ndarray] | None:
    """Per-image [K, 7] rows (x1, y1, x2, y2, score, class, anchor) of a recorded decode, the best K anchors by score
    with those not kept scored -1, to what gpu_candidates gives: the kept rows in anchor order, [k, 6]. None when an
    image kept all K (more may have passed: the caller takes the exact path). One pass over the whole batch: per
    image on the finishing thread cost more, as that thread is the busier one (measured on an H100)."""
    kept = top[..., 4] >= 0
    if kept[:, -1].any():
        return None
    image, _ = np.nonzero(kept)
    rows = top[kept]
    rows = rows[np.lexsort((rows[:, 6], image))]
    counts = np.bincount(image, minlength=len(top))
    return np.split(rows[:, :6], np.cumsum(counts)[:-1])


class TensorRTBackend:
    """Runs the ONNX model as a TensorRT 10 engine built with FP16 and a 1..max_batch batch profile, cached on disk
    by model hash, GPU name and TensorRT version. Unverified: TensorRT is not installed on any machine we can run."""

    name = "tensorrt"

    def __init__(self, max_batch: int = 1, cache_dir: Path | None = None) -> None:
        try:
            import tensorrt
        except ImportError:
            raise ValueError(f"backend {self.name}: TensorRT is not installed (pip install tensorrt; "
                             "it also needs PyTorch with CUDA)") from None
        self.trt = tensorrt
        self.torch = _require_torch_cuda(self.name)
        self.max_batch = max_batch
        self.cache_dir = cache_dir or Path(os.environ.get("GRAPHFLOW_CACHE", "~/.cache/graphflow")).expanduser()
        self.logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        self.input: ModelInput | None = None

    def cache_path(self, path: Path, onnx_bytes: bytes) -> Path:
        """Where the engine built for this model, GPU, TensorRT version and batch profile is kept."""
        key = hashlib.sha256(onnx_bytes)
        key.update(f"{self.torch.cuda.get_device_name()}|{self.trt.__version__}|{self.max_batch}|fp16".encode())
        return self.cache_dir / "tensorrt" / f"{Path(path).stem}-{key.hexdigest()[:16]}.engine"

    def _build(self, path: Path, onnx_bytes: bytes) -> bytes:
        """Parse the ONNX model and build a serialized FP16 engine with one optimisation profile over the batch."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            raise ValueError(f"model {path}: TensorRT cannot parse it ({parser.get_error(0).desc()})")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        width, height = self.input.size
        top = self.max_batch if self.input.dynamic_batch else 1
        profile.set_shape(self.input.name, (1, 3, height, width), (top, 3, height, width), (top, 3, height, width))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ValueError(f"model {path}: TensorRT could not build an engine (see its log above)")
        return bytes(plan)

    def load(self, path: Path) -> None:
        """Load the cached engine, or build and cache it (minutes for large models), and open an execution context."""
        self.input = inspect_onnx(Path(path)).input
        onnx_bytes = Path(path).read_bytes()
        cached = self.cache_path(path, onnx_bytes)
        if cached.is_file():
            plan = cached.read_bytes()
        else:
            log.info("building TensorRT engine for %s (max batch %d)", path, self.max_batch)
            plan = self._build(path, onnx_bytes)
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            partial.write_bytes(plan)
            partial.replace(cached)
        self.engine = self.trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ValueError(f"model {path}: TensorRT cannot load the engine {cached} (delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]

    def prepare(self, batch: Any) -> Any:
        """The batch as a contiguous float32 CUDA tensor (the engine's FP16 layers take float32 I/O)."""
        return _to_torch(batch, self.torch).float().contiguous()

    def _run(self, batch: Any) -> np.ndarray:
        """One execute_async_v3 call on torch's current stream, I/O in torch CUDA tensors."""
        torch = self.torch
        x = self.prepare(batch)
        self.context.set_input_shape(self.input.name, tuple(x.shape))
        self.context.set_tensor_address(self.input.name, x.data_ptr())
        outputs = []
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"backend {self.name}: execute_async_v3 failed")
        return outputs[0].float().cpu().numpy()

    def infer(self, batch: Any) -> np.ndarray:
        """Run a [N, 3, H, W] batch in slices the engine's profile allows; returns the first output."""
        return _in_chunks(self._run, batch, self.max_batch if self.input.dynamic_batch else 1)


def _torch_ready() -> bool:
    """Whether the torch backend can run here (checked without importing torch when it is not installed)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx2torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def make_backend(kind: str, threads: int = 0, max_batch: int = 1) -> Backend:
    """A backend by name; "auto" takes torch on a CUDA GPU when installed, else onnxruntime (its CUDA provider if
    present, else CPU). An unavailable backend raises a one-line ValueError saying what to install."""
    if kind == "auto":
        return TorchBackend(max_batch=max_batch) if _torch_ready() else OnnxRuntimeBackend(threads, gpu=True)
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(threads)
    if kind == "torch":
        return TorchBackend(max_batch=max_batch)
    if kind == "tensorrt":
        return TensorRTBackend(max_batch)
    raise ValueError(f"backend {kind}: not available (choices: {', '.join(BACKENDS)})")
