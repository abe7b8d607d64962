"""Triton's logging extension on a real server, from both tritonclients: the log settings read and
changed while it serves, with effect on what it logs; bad settings refused, nothing changed."""

import json
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from helpers import ServerProcess, triton_infer
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc

MODEL = "resnet-mnist"
DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "text"}


def grpc_settings(response: dict) -> dict:
    """tritonclient.grpc's JSON answer, as plain values."""
    return {name: next(iter(value.values())) for name, value in response["settings"].items()}


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as running:
        yield running


def test_both_clients_read_the_settings_the_server_started_with(server):
    assert "logging" in triton_http.InferenceServerClient(server.http_target).get_server_metadata()["extensions"]
    assert grpc_settings(triton_grpc.InferenceServerClient(server.target).get_log_settings(as_json=True)) == DEFAULTS
    assert triton_http.InferenceServerClient(server.http_target).get_log_settings() == DEFAULTS


def test_verbose_logging_turns_the_access_log_on_and_off_while_serving(server):
    client = triton_grpc.InferenceServerClient(server.target)
    on = grpc_settings(client.update_log_settings({"log_verbose_level": 1}, as_json=True))
    assert on == {**DEFAULTS, "log_verbose_level": 1}
    lines = len(server.lines)
    triton_infer(client, np.zeros((1, 1, 28, 28), np.float32))
    server.wait_for_line("DEBUG resserve.serve: grpc kserve resnet-mnist: OK in ", lines)
    http = triton_http.InferenceServerClient(server.http_target)
    lines = len(server.lines)
    assert http.update_log_settings({"log_verbose_level": 0}) == DEFAULTS  # the other front door, same settings
    server.wait_for_line("log settings changed through the API: {'log_file': '', 'log_info': True, 'log_warning': "
                          "True, 'log_error': True, 'log_verbose_level': 0", lines)
    lines = len(server.lines)
    triton_infer(client, np.zeros((1, 1, 28, 28), np.float32))
    http.update_log_settings({"log_info": True})  # a change that changes nothing is not logged either
    time.sleep(0.5)
    assert not [line for line in server.lines[lines:] if " DEBUG " in line or "log settings changed" in line]


def test_the_access_log_says_who_asked_and_what_they_were_told(server):
    """A client's failure can be told from the server's log: its address and the message it got."""
    http = triton_http.InferenceServerClient(server.http_target)
    http.update_log_settings({"log_verbose_level": 1})
    try:
        lines = len(server.lines)
        for client in (triton_grpc.InferenceServerClient(server.target), http):
            with pytest.raises(InferenceServerException, match="shape"):
                triton_infer(client, np.zeros((1, 1, 28, 27), np.float32))
        told = "input has shape [1, 1, 28, 27]; expected [N, 1, 28, 28]"
        grpc_line = server.wait_for_line("grpc kserve resnet-mnist: INVALID_ARGUMENT in ", lines)
        assert ", from ipv4:127.0.0.1:" in grpc_line and grpc_line.rstrip().endswith(told)
        http_line = server.wait_for_line("http kserve resnet-mnist: 400 in ", lines)
        assert ", from 127.0.0.1: " in http_line and http_line.rstrip().endswith(told)
        lines = len(server.lines)
        http.get_log_settings()  # about no model
        assert server.wait_for_line("http kserve_logging: 200 in ", lines).rstrip().endswith(", from 127.0.0.1")

        http.update_log_settings({"log_format": "json"})
        lines = len(server.lines)
        triton_infer(http, np.zeros((1, 1, 28, 28), np.float32))
        record = json.loads(server.wait_for_line('"message": "http kserve resnet-mnist: 200 in ', lines))
        assert {key: record[key] for key in ("protocol", "api", "model", "status", "peer", "error")} == {
            "protocol": "http", "api": "kserve", "model": "resnet-mnist", "status": "200", "peer": "127.0.0.1",
            "error": ""}
        assert 0 < record["ms"] < 10_000
    finally:
        http.update_log_settings({"log_verbose_level": 0, "log_format": "text"})


def test_turning_info_off_keeps_info_lines_out_until_it_is_on_again(server):
    http = triton_http.InferenceServerClient(server.http_target)
    assert http.update_log_settings({"log_info": False})["log_info"] is False
    lines = len(server.lines)
    http.update_log_settings({"log_verbose_level": 0, "log_warning": False})  # logged at INFO: not written
    assert http.update_log_settings({"log_info": True, "log_warning": True}) == DEFAULTS
    back_on = server.wait_for_line("INFO resserve.serve: log settings changed through the API: {'log_file': '', "
                                    "'log_info': True, 'log_warning': True", lines)
    assert [line for line in server.lines[lines:] if "log settings changed" in line] == [back_on]


def test_json_format_from_then_on(server):
    http = triton_http.InferenceServerClient(server.http_target)
    lines = len(server.lines)
    assert http.update_log_settings({"log_format": "json"})["log_format"] == "json"
    record = json.loads(server.wait_for_line('"message": "log settings changed through the API', lines))
    assert record["level"] == "INFO" and record["name"] == "resserve.serve"
    assert http.update_log_settings({"log_format": "text"}) == DEFAULTS
    assert all(line.startswith("{") for line in server.lines[lines:-1])


@pytest.mark.parametrize("settings, message", [
    ({"log_file": "/etc/cron.d/x"}, 'log_file: resserve logs to stderr only, a client may not choose a file the '
                                    'server writes; "" is the one value, got \'/etc/cron.d/x\''),
    ({"log_verbose_level": 1, "log_format": "ISO8601"}, "log_format takes text or json, got 'ISO8601'"),
    ({"log_colour": True}, "unknown log setting 'log_colour'; resserve's: log_file, log_info, log_warning, "
                           "log_error, log_verbose_level, log_format"),
])
def test_a_bad_setting_is_refused_and_changes_nothing(server, settings, message):
    with pytest.raises(InferenceServerException) as over_grpc:
        triton_grpc.InferenceServerClient(server.target).update_log_settings(settings)
    assert over_grpc.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert over_grpc.value.message() == message
    with pytest.raises(InferenceServerException) as over_http:
        triton_http.InferenceServerClient(server.http_target).update_log_settings(settings)
    assert (over_http.value.status(), over_http.value.message()) == ("400", message)
    assert triton_http.InferenceServerClient(server.http_target).get_log_settings() == DEFAULTS


@pytest.mark.parametrize("body, message", [
    (b"[1]", 'the request must be a JSON object of log settings, such as {"log_verbose_level": 1}'),
    (b'{"log_verbose_level": -1}', "log_verbose_level takes a whole number >= 0, got -1"),
    (b'{"log_verbose_level": 1.5}', "log_verbose_level takes a whole number >= 0, got 1.5"),
    (b'{"log_verbose_level": true}', "log_verbose_level takes a whole number >= 0, got True"),
])
def test_a_malformed_http_request_is_400(server, body, message):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/logging", data=body), timeout=10)
    assert (info.value.code, json.loads(info.value.read())) == (400, {"error": message})


@pytest.mark.parametrize("value, message", [
    (kserve_pb2.LogSettingsRequest.SettingValue(uint32_param=1), "log_info takes true or false, got 1"),
    (kserve_pb2.LogSettingsRequest.SettingValue(), "log_info takes true or false, got None"),  # no value
])
def test_a_grpc_setting_of_the_wrong_type_is_refused(server, value, message):
    request = kserve_pb2.LogSettingsRequest()
    request.settings["log_info"].CopyFrom(value)
    with pytest.raises(grpc.RpcError) as info:
        kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target)).LogSettings(request, timeout=10)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert triton_http.InferenceServerClient(server.http_target).get_log_settings() == DEFAULTS



def test_with_tokens_the_log_settings_take_one(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with ServerProcess("--token-file", str(tokens)) as guarded:
        with pytest.raises(InferenceServerException) as over_grpc:
            triton_grpc.InferenceServerClient(guarded.target).update_log_settings({"log_verbose_level": 1})
        with pytest.raises(InferenceServerException) as over_http:
            triton_http.InferenceServerClient(guarded.http_target).update_log_settings({"log_verbose_level": 1})
        allowed = triton_http.InferenceServerClient(guarded.http_target).get_log_settings(
            headers={"Authorization": "Bearer s3cret"})
    assert over_grpc.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert over_http.value.status() == "401"
    assert allowed == DEFAULTS  # neither refused change was made
