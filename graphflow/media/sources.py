"""Opening a source: the decoder that fits a source spec (image folder, file or stream on the CPU, NVDEC on a GPU)."""
from __future__ import annotations

from typing import Any

from graphflow.media.nvdec import NvdecSource
from graphflow.media.video import IMAGE_SUFFIXES, AVSource, ImageSource, Source, SourceError, SourceSpec, local_path


def open_source(spec: SourceSpec | dict[str, Any]) -> Source:
    """The right source for `spec` (a SourceSpec or a dict of its fields), opened and ready to iterate."""
    if isinstance(spec, dict):
        unknown = set(spec) - set(SourceSpec.__dataclass_fields__)
        if unknown:
            raise SourceError(f"source {spec.get('uri', '?')}: unknown field(s) {', '.join(sorted(unknown))}")
        if "uri" not in spec:
            raise SourceError("source: 'uri' is required")
        spec = SourceSpec(**spec)
    local = None if spec.is_stream else local_path(spec.uri)
    if local is not None and (local.is_dir() or local.suffix.lower() in IMAGE_SUFFIXES):
        return ImageSource(spec)
    if spec.hwaccel == "nvdec":  # frames stay on the GPU as NV12
        return NvdecSource(spec)
    return AVSource(spec)
