"""The ghz configs in loadtest/ name RPCs and fields that exist in protos/ and carry
requests that parse as the RPC's request message (ghz cannot be installed here, so this
is what stands between a typo and a load test that fails in a user's hands)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from PIL import Image

from benchmarks.loadgen import LoadConfig
from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.search.v1 import search_pb2

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = ROOT / "loadtest"
CONFIGS = sorted(LOADTEST.glob("*.json"))
FILE_DESCRIPTORS = (encoder_pb2.DESCRIPTOR, search_pb2.DESCRIPTOR)

# Every key ghz reads from a config file (runner.Config's json tags), plus "binary": ghz
# ignores it (a CLI flag for stdin data) while benchmarks/loadgen.py reads it to know that
# "binary-file" holds the request.
GHZ_KEYS = {
    "proto", "protoset", "call", "import-paths", "cacert", "cert", "key", "cname",
    "skip-verify", "skipTLS", "insecure", "authority", "async", "rps", "load-schedule",
    "load-start", "load-end", "load-step", "load-step-duration", "load-max-duration",
    "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
    "concurrency-step", "concurrency-step-duration", "concurrency-max-duration", "total",
    "timeout", "duration", "max-duration", "duration-stop", "data", "data-file", "binary-file",
    "metadata", "metadata-file", "stream-interval", "stream-call-duration", "stream-call-count",
    "stream-dynamic-messages", "reflect-metadata", "output", "format", "skip-first",
    "count-errors", "connections", "connect-timeout", "keepalive", "enable-compression",
    "lb-strategy", "name", "tags", "cpus", "debug", "host", "binary",
}
DURATION_KEYS = ("timeout", "duration", "max-duration", "connect-timeout", "keepalive",
                 "stream-interval", "load-step-duration", "load-max-duration")
GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
WANTED_CALLS = {"clipsearch.encoder.v1.Encoder.EncodeText",
                "clipsearch.encoder.v1.Encoder.EncodeImage",
                "clipsearch.search.v1.Search.SearchText"}


def load(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    assert isinstance(config, dict), f"{path.name}: not a JSON object"
    return config


def find_method(call: str) -> MethodDescriptor:
    """The method a ghz "call" (package.Service.Method or package.Service/Method) names."""
    service_name, _, method_name = call.replace("/", ".").rpartition(".")
    for file in FILE_DESCRIPTORS:
        package, _, short = service_name.rpartition(".")
        if package != file.package:
            continue
        service = file.services_by_name.get(short)
        if service is not None and method_name in service.methods_by_name:
            return service.methods_by_name[method_name]
    raise LookupError(f"no RPC {call!r} in protos/")


def request_class(method: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.input_type)


def test_the_three_load_tests_are_there() -> None:
    calls = {load(path).get("call") for path in CONFIGS}
    assert calls >= WANTED_CALLS, f"missing ghz configs for {WANTED_CALLS - calls}"


def test_find_method_refuses_what_the_protos_lack() -> None:
    with pytest.raises(LookupError):
        find_method("clipsearch.encoder.v1.Encoder.EncodeAudio")
    with pytest.raises(LookupError):
        find_method("clipsearch.search.v2.Search.SearchText")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_ghz_keys(path: Path) -> None:
    config = load(path)
    unknown = set(config) - GHZ_KEYS
    assert not unknown, f"{path.name}: keys ghz does not know: {sorted(unknown)}"
    for key in DURATION_KEYS:
        if key in config:
            assert GO_DURATION.fullmatch(str(config[key])), \
                f"{path.name}: {key}={config[key]!r} is not a Go duration (e.g. 30s, 500ms)"
    assert config.get("insecure") is True, f"{path.name}: our services serve plaintext by default"
    assert re.fullmatch(r"[\w.-]+:\d+", config.get("host", "")), \
        f"{path.name}: host must be host:port, got {config.get('host')!r}"
    assert isinstance(config.get("concurrency"), int) and config["concurrency"] > 0
    assert ("total" in config) or ("duration" in config), f"{path.name}: no total nor duration"
    if "rps" in config:
        assert isinstance(config["rps"], int) and config["rps"] >= 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_call_exists_in_the_proto_file_named(path: Path) -> None:
    """ghz parses "proto" itself (reflection-only runs fail against Python servers,
    ghz#419): the file must exist, be reachable from "import-paths" and define the call."""
    config = load(path)
    method = find_method(config["call"])
    proto = ROOT / config["proto"]
    assert proto.is_file(), f"{path.name}: proto {config['proto']} does not exist"
    import_paths = config.get("import-paths") or []
    assert import_paths, f"{path.name}: give import-paths (relative to the repo root)"
    for folder in import_paths:
        assert (ROOT / folder).is_dir(), f"{path.name}: import path {folder} does not exist"
    # The proto's name relative to an import path is the name protoc gave the file.
    names = {proto.relative_to(ROOT / folder).as_posix() for folder in import_paths
             if proto.is_relative_to(ROOT / folder)}
    assert method.containing_service.file.name in names, (
        f"{path.name}: {config['call']} is defined in {method.containing_service.file.name}, "
        f"not in {config['proto']} under {import_paths}")
    assert not method.client_streaming and not method.server_streaming, \
        f"{path.name}: these configs are for unary RPCs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_payload_parses_as_the_request_message(path: Path) -> None:
    config = load(path)
    method = find_method(config["call"])
    cls = request_class(method)
    has_data, has_binary = "data" in config, "binary-file" in config
    assert has_data != has_binary, f"{path.name}: give exactly one of data and binary-file"
    if has_data:
        # ghz reads data as protojson: unknown fields or wrong types fail the run.
        request = json_format.ParseDict(config["data"], cls())
        assert request.ByteSize() > 0, f"{path.name}: data is an empty request"
        assert "binary" not in config
    else:
        assert config.get("binary") is True, \
            f"{path.name}: a binary-file config also says \"binary\": true (benchmarks/loadgen)"
        payload = (ROOT / config["binary-file"]).read_bytes()
        request = cls.FromString(payload)
        assert request.SerializeToString() == payload, f"{path.name}: payload has stray bytes"
        assert isinstance(request, encoder_pb2.EncodeImageRequest)
        assert len(request.images) >= 1
        for data in request.images:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                assert image.width > 0 and image.height > 0


def test_data_with_a_misspelt_field_is_refused() -> None:
    """The check above can fail: ParseDict refuses what ghz would refuse."""
    assert request_class(find_method("clipsearch.search.v1.Search.SearchText")) \
        is search_pb2.SearchTextRequest
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({"text": "a white dog", "topk": 10}, search_pb2.SearchTextRequest())
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({"text": "a white dog", "top_k": "ten"},
                              search_pb2.SearchTextRequest())
    # protojson accepts the lowerCamelCase name as well as the proto name.
    parsed = json_format.ParseDict({"text": "a", "topK": 3}, search_pb2.SearchTextRequest())
    assert parsed.top_k == 3


def test_a_payload_that_is_not_an_image_request_is_refused() -> None:
    with pytest.raises(DecodeError):
        encoder_pb2.EncodeImageRequest.FromString(b"\xff\xd8\xff\xe0 not a message")


def test_make_payloads_reproduces_the_committed_payload(tmp_path: Path) -> None:
    image = ROOT.parent / "shared" / "data" / "imagenet-sample" / "n02112137_chow.JPEG"
    if not image.exists():
        pytest.skip(f"{image} is not here")
    out = tmp_path / "encode_image.bin"
    subprocess.run([sys.executable, str(LOADTEST / "make_payloads.py"), "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=60)
    assert out.read_bytes() == (LOADTEST / "encode_image.bin").read_bytes()


def test_template_actions_are_filled_in_per_call() -> None:
    config = LoadConfig(call="clipsearch.search.v1.Search.SearchText",
                        data={"text": "a white dog {{.RequestNumber}}", "top_k": 3,
                              "filter": {"uri_prefix": "{{ .UUID }}"}})
    requests = config.requests()
    first, eighth = requests(0), requests(7)
    assert (first.text, eighth.text) == ("a white dog 0", "a white dog 7")
    assert first.top_k == eighth.top_k == 3
    assert len(first.filter.uri_prefix) == 36 and first.filter.uri_prefix != \
        eighth.filter.uri_prefix


def test_data_without_actions_is_one_message() -> None:
    requests = LoadConfig(call="clipsearch.search.v1.Search.SearchText",
                          data={"text": "a white dog"}).requests()
    assert requests(0) is requests(5)
    assert requests(0).text == "a white dog"
