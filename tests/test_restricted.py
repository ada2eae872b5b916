"""Restricted mode (graphs from untrusted sources): nothing outside the allow-list is imported, files are read only
under media roots and written only under the output root without replacing any, binds stay on loopback, and only
allowed URI schemes are opened. Each refusal is one line naming the field. Plain validate never runs setup()."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graphflow import graph
from graphflow.errors import GraphError
from graphflow.graph.restrictions import SAFE_ENGINES, Restrictions

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "graphs" / "data" / "demo.mp4"


@pytest.fixture
def site(tmp_path):
    """tmp/media (the demo video), tmp/out (the output root) and a policy over them."""
    (tmp_path / "media").mkdir()
    (tmp_path / "out").mkdir()
    shutil.copy(VIDEO, tmp_path / "media" / "cam1.mp4")  # a copy: a link leading out of the root is refused
    return tmp_path, Restrictions(output_root=tmp_path / "out", media_roots=(tmp_path / "media",))


def doc(uri="cam1.mp4", sinks=None, model="yolox-nano", **extra):
    engines = {"src": {"type": "decode", "params": {"sources": [{"id": "c", "uri": uri}]}},
               "det": {"type": "infer", "params": {"model": model}},
               "out": {"type": "publish", "params": {"sinks": sinks or [{"kind": "jsonl", "path": "events.jsonl"}]}}}
    engines.update(extra)
    return {"engines": engines, "connections": [["src", "det"], ["det", "out"]]}


def refused(document, policy, file="net.json"):
    with pytest.raises(GraphError) as info:
        graph.build(document, file, restrictions=policy)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_a_plain_graph_inside_the_roots_is_accepted(site):
    tmp, policy = site
    g = graph.build(doc(), "net.json", restrictions=policy)
    assert g.nodes["src"].params["sources"][0]["uri"] == str(tmp / "media" / "cam1.mp4")
    assert g.nodes["out"].params["sinks"][0]["path"] == str(tmp / "out" / "events.jsonl")


def test_types_outside_the_allow_list_are_not_imported(site, tmp_path, monkeypatch):
    _, policy = site
    (tmp_path / "noisy.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                       "from graphflow import Engine\nclass E(Engine):\n    outputs = ()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "noisy", raising=False)
    bad = doc()
    bad["engines"]["x"] = {"type": "noisy:E"}
    bad["connections"].append(["det", "x"])
    assert refused(bad, policy).startswith("net.json: engines.x.type: engine type 'noisy:E' is not allowed in "
                                           "restricted mode (allowed: decode, detfile")
    assert not (tmp_path / "imported").exists()
    bad["engines"]["x"]["type"] = "this:x"
    assert "engines.x.type: engine type 'this:x' is not allowed" in refused(bad, policy)
    allowed = Restrictions(output_root=policy.output_root, media_roots=policy.media_roots, modules=("noisy",))
    bad["engines"]["x"] = {"type": "noisy:E"}
    assert graph.build(bad, "net.json", restrictions=allowed).nodes["x"].cls.__name__ == "E"
    assert (tmp_path / "imported").exists()


def test_map_functions_and_sink_paths_are_checked(site):
    tmp, policy = site
    document = doc(fn={"type": "map", "params": {"function": "os:system"}}, log={"type": "sink"})
    document["connections"] += [["det", "fn"], ["fn", "log"]]
    assert "engines.fn.type: engine type 'map' is not allowed in restricted mode" in refused(document, policy)
    policy = Restrictions(output_root=policy.output_root, media_roots=policy.media_roots, engines=SAFE_ENGINES | {"map"})
    assert "engines.fn.params.function: module 'os' is not allowed in restricted mode (allowed: none)" in \
        refused(document, policy)
    document["engines"]["fn"]["params"]["function"] = "graphflow.examples:identity"
    allowed = Restrictions(output_root=policy.output_root, media_roots=policy.media_roots, engines=policy.engines,
                     modules=("graphflow.examples",))
    assert graph.build(document, "net.json", restrictions=allowed).nodes["log"].params == {}  # '-': stdout
    document["engines"]["log"]["params"] = {"path": "../x.jsonl"}
    assert f"engines.log.params.path: {tmp}/x.jsonl is outside the output root" in refused(document, allowed)


@pytest.mark.parametrize("path,message", [
    ("../../evil.jsonl", "engines.out.params.sinks[0].path: {up}/evil.jsonl is outside the output root ({tmp}/out)"),
    ("/etc/passwd", "engines.out.params.sinks[0].path: /etc/passwd is outside the output root"),
    ("sub/../../x.jsonl", "is outside the output root"),
])
def test_sink_paths_stay_inside_the_output_root(site, path, message):
    tmp, policy = site
    assert message.format(tmp=tmp, up=tmp.parent) in refused(doc(sinks=[{"kind": "jsonl", "path": path}]), policy)


def test_a_link_out_of_the_output_root_is_refused(site):
    tmp, policy = site
    (tmp / "out" / "link").symlink_to(tmp)
    text = refused(doc(sinks=[{"kind": "jsonl", "path": "link/x.jsonl"}]), policy)
    assert f"sinks[0].path: {tmp}/x.jsonl is outside the output root" in text


def test_existing_outputs_are_not_replaced(site):
    tmp, policy = site
    (tmp / "out" / "events.jsonl").write_text("precious\n")
    assert "sinks[0].path: " + str(tmp / "out" / "events.jsonl") + " exists; restricted mode replaces a file only " \
           "where the sink says \"overwrite\": true" in refused(doc(), policy)
    (tmp / "out" / "v_c.mp4").write_bytes(b"")
    assert "v_c.mp4 exists" in refused(doc(sinks=[{"kind": "video", "path": "v_{stream}.mp4"}]), policy)
    (tmp / "out" / "w.c.mp4").write_bytes(b"")
    assert "w.c.mp4 exists" in refused(doc(sinks=[{"kind": "video", "path": "w.mp4"}]), policy)


def test_overwrite_true_lets_a_declared_output_be_replaced(site, tmp_path, monkeypatch):
    _, policy = site
    (tmp_path / "reports.py").write_text(
        "from graphflow import Engine, Param\nclass Report(Engine):\n    outputs = ()\n"
        "    path_fields = {'files[].path': 'write'}\n    files = Param(list, [])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = Restrictions(output_root=policy.output_root, media_roots=policy.media_roots, modules=("reports",))
    (policy.output_root / "r.txt").write_text("old")
    report = {"type": "reports:Report", "params": {"files": [{"path": "r.txt"}]}}
    document = doc(rep=report)
    document["connections"].append(["det", "rep"])
    assert "engines.rep.params.files[0].path: " in refused(document, policy)
    report["params"]["files"][0]["overwrite"] = True
    assert graph.build(document, "net.json", restrictions=policy).nodes["rep"].params["files"][0]["path"] == \
        str(policy.output_root / "r.txt")


@pytest.mark.parametrize("address,ok", [("tcp://127.0.0.1:5599", True), ("tcp://[::1]:5599", True),
                                         ("tcp://0.0.0.0:5599", False), ("tcp://*:5599", False),
                                         ("tcp://eth0:5599", False), ("ipc://../../x.sock", False)])
def test_zmq_binds_loopback_only(site, address, ok):
    _, policy = site
    document = doc(sinks=[{"kind": "zmq", "address": address}])
    if ok:
        graph.build(document, "net.json", restrictions=policy)
    else:
        assert refused(document, policy).startswith("net.json: engines.out.params.sinks[0].address: ")


@pytest.mark.parametrize("uri,message", [
    ("http://example.com/cam.mp4", "sources[0].uri: http:// is not allowed in restricted mode (allowed: file, rtsp"),
    ("udp://0.0.0.0:1234", "sources[0].uri: udp:// is not allowed"),
    ("srt://example.com:9000", "sources[0].uri: srt:// is not allowed"),
    (str(VIDEO), f"sources[0].uri: {VIDEO} is outside a media root"),
    ("../out/../media/../../x.mp4", "is outside a media root"),
    ("file:///etc/hosts", "sources[0].uri: /etc/hosts is outside a media root"),
])
def test_decode_uris_schemes_and_media_roots(site, uri, message):
    _, policy = site
    assert message in refused(doc(uri=uri), policy)


def test_rtsp_is_allowed_and_a_model_file_must_be_under_a_media_root(site):
    tmp, policy = site
    graph.build(doc(uri="rtsp://127.0.0.1:8554/cam"), "net.json", restrictions=policy)
    onnx = ROOT / "graphflow" / "models" / "yolox_nano.onnx"
    assert f"engines.det.params.model: {onnx} is outside a media root" in refused(doc(model=str(onnx)), policy)
    shutil.copy(onnx, tmp / "media" / "det.onnx")
    g = graph.build(doc(model="det.onnx"), "net.json", restrictions=policy)
    assert g.nodes["det"].params["model"] == str(tmp / "media" / "det.onnx")


def test_set_values_are_checked_too(site):
    _, policy = site
    with pytest.raises(GraphError, match=r"engines.out.params.sinks\[0\].path: .* is outside the output root"):
        graph.build(doc(), "net.json", graph.parse_set(["out.sinks.0.path=../../x.jsonl"]), restrictions=policy)


SETUP_MARKS = '''
from graphflow import Engine, Param

class Marks(Engine):
    outputs = ()
    mark = Param(str)

    def setup(self):
        open(self.mark, "w").close()

    def process(self, msg):
        pass
'''


def test_validate_runs_no_engine_setup(tmp_path):
    (tmp_path / "markengines.py").write_text(SETUP_MARKS)
    mark = tmp_path / "setup-ran"
    (tmp_path / "g.json").write_text(json.dumps({
        "engines": {"src": {"type": "source"}, "m": {"type": "markengines:Marks", "params": {"mark": str(mark)}}},
        "connections": [["src", "m"]]}))
    proc = subprocess.run([sys.executable, "-m", "graphflow", "validate", str(tmp_path / "g.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not mark.exists()


def test_a_state_folder_may_exist_but_stays_inside_the_output_root(site, tmp_path, monkeypatch):
    _, policy = site
    (tmp_path / "keepers.py").write_text(
        "from graphflow import Engine, Param\nclass Keep(Engine):\n    outputs = ()\n"
        "    spool = Param(str, path='state')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = Restrictions(output_root=policy.output_root, media_roots=policy.media_roots, modules=("keepers",))
    (policy.output_root / "spool").mkdir()
    (policy.output_root / "spool" / "0001.log").write_text("pending")
    document = doc(keep={"type": "keepers:Keep", "params": {"spool": "spool"}})
    document["connections"].append(["det", "keep"])
    assert graph.build(document, "net.json", restrictions=policy).nodes["keep"].params["spool"] == \
        str(policy.output_root / "spool")
    document["engines"]["keep"]["params"]["spool"] = "../spool"
    assert "engines.keep.params.spool: " + str(tmp_path / "spool") + " is outside the output root" in \
        refused(document, policy)


def test_a_stream_added_over_the_network_is_resolved_and_checked(site):
    """The service adds streams to a running decode: the entry alone goes through the same checks."""
    from graphflow.engines.decode import Decode
    from graphflow.errors import ParamError

    tmp, policy = site
    entry = policy.admit(Decode, {"sources": [{"id": "cam2", "uri": "cam1.mp4"}]})["sources"][0]
    assert entry == {"id": "cam2", "uri": str(tmp / "media" / "cam1.mp4")}
    with pytest.raises(ParamError, match=r"^sources\[0\].uri: http:// is not allowed in restricted mode"):
        policy.admit(Decode, {"sources": [{"id": "cam3", "uri": "http://example.com/x.mp4"}]})
    with pytest.raises(ParamError, match=r"^sources\[0\].uri: .* is outside a media root"):
        policy.admit(Decode, {"sources": [{"id": "cam3", "uri": "../out/../../secret.mp4"}]})
