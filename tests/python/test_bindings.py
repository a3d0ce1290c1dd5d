"""The ctypes declarations match the C contract (API.md and the generated header), and
the library is found where the README says."""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest

import tcpframe
from tcpframe import _lib
from tcpframe import constants as C
from conftest import REPO

HEADER = REPO / "include" / "tcpframe.h"

API_FUNCTIONS = {
    "tf_config_new": 0, "tf_config_free": 1, "tf_config_set_address": 2,
    "tf_config_set_max_connections": 2, "tf_config_set_max_frame": 2,
    "tf_config_set_idle_timeout_ms": 2, "tf_config_set_max_queued_output": 2,
    "tf_server_start": 3, "tf_server_port": 1, "tf_send": 4, "tf_conn_close": 2,
    "tf_server_stats": 2, "tf_server_stop": 2, "tf_server_free": 1, "tf_last_error": 0,
    "tf_version": 0, "tf_config_set_backend": 2, "tf_server_start_pull": 2, "tf_server_fd": 1,
    "tf_server_poll": 5, "tf_config_set_log": 3,
    "tf_conn_abort": 2, "tf_config_set_close_timeout_ms": 2, "tf_config_set_max_buffered": 2,
    "tf_config_set_on_messages": 2, "tf_send_batch": 3, "tf_events_pack": 5, "tf_send_packed": 6,
    # API.md "Second set of additions" (reach, cores, scale-out, host control)
    "tf_config_set_prefix": 3, "tf_config_set_unix_mode": 2, "tf_config_set_connect_timeout_ms": 2,
    "tf_config_set_threads": 2, "tf_config_set_proxy_protocol": 2,
    "tf_config_set_max_connections_per_ip": 2, "tf_config_set_on_writable": 2,
    "tf_config_set_slow_consumer": 3, "tf_connect": 3, "tf_server_drain": 1,
    "tf_conn_set_user_data": 3, "tf_conn_user_data": 2, "tf_conn_pause": 2, "tf_conn_resume": 2,
    "tf_sendv": 4, "tf_send_many": 6, "tf_conn_get_info": 3,
}


def test_every_api_function_is_declared_and_exported():
    assert set(_lib.SIGNATURES) == set(API_FUNCTIONS)
    for name, nargs in API_FUNCTIONS.items():
        assert len(_lib.SIGNATURES[name][1]) == nargs, name
    tcpframe.load_library()
    assert _lib.MISSING == []
    cdll = _lib.lib()
    for name, (restype, argtypes) in _lib.SIGNATURES.items():
        fn = getattr(cdll, name)
        assert fn.argtypes == argtypes and fn.restype == restype, name


def _header_text():
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not generated yet")
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _top_level_params(params):
    params = params.strip()
    if params in ("", "void"):
        return 0
    depth, count = 0, 1
    for ch in params:
        depth += ch == "("
        depth -= ch == ")"
        count += ch == "," and depth == 0
    return count


def test_header_prototypes_match_our_argument_counts():
    text = _header_text()
    protos = {m.group(1): _top_level_params(m.group(2))
              for m in re.finditer(r"\b(tf_\w+)\s*\(((?:[^()]|\([^()]*\))*)\)\s*;", text)}
    for name, nargs in API_FUNCTIONS.items():
        assert name in protos, f"{name} missing from the header"
        assert protos[name] == nargs, f"{name}: header has {protos[name]} parameters"


def _struct_fields(text, name):
    m = re.search(r"struct\s+%s\s*\{(.*?)\}" % name, text, flags=re.S)
    assert m, f"struct {name} not in header"
    fields = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if decl:
            fm = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl) or re.search(r"(\w+)\s*(\[[^\]]*\])?$", decl)
            fields.append(fm.group(1))
    return fields


def test_header_structs_match_ctypes_layouts():
    text = _header_text()
    assert _struct_fields(text, "tf_stats") == _lib.STATS_FIELDS
    assert _struct_fields(text, "tf_event") == [f for f, _ in _lib.TfEvent._fields_]
    assert _struct_fields(text, "tf_callbacks") == [f for f, _ in _lib.TfCallbacks._fields_]
    assert _struct_fields(text, "tf_out") == [f for f, _ in _lib.TfOut._fields_]
    assert ctypes.sizeof(_lib.TfEvent) == 32 and ctypes.sizeof(_lib.TfCallbacks) == 32
    assert ctypes.sizeof(_lib.TfOut) == 32


def test_header_constants_match_ours():
    text = _header_text()
    found = dict(re.findall(r"#define\s+(TF_[A-Z0-9_]+)\s+\(?\s*\(?(?:int32_t|int)?\)?\s*(-?\d+)", text))
    found.update(re.findall(r"\b(TF_[A-Z0-9_]+)\s*=\s*(-?\d+)", text))
    ours = {k: v for k, v in vars(C).items() if k.startswith("TF_")}
    assert len(ours) == 35  # 25, then 10 from API.md's second set of additions
    missing = sorted(set(ours) - set(found))
    assert missing == []
    assert {k: int(found[k]) for k in ours} == ours


def _run_python(code, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("TCPFRAME_LIB", "CARGO_TARGET_DIR")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def test_tcpframe_lib_env_wins_and_a_bad_one_is_a_clear_error(tmp_path):
    src = str(REPO / "python")
    real = tcpframe.library_path()
    ok = _run_python("import tcpframe; print(tcpframe.library_path(), tcpframe.library_version())",
                     {"PYTHONPATH": src, "TCPFRAME_LIB": real}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[0] == real
    bad = _run_python("import tcpframe; tcpframe.library_version()",
                      {"PYTHONPATH": src, "TCPFRAME_LIB": str(tmp_path / "nope.so")}, tmp_path)
    assert bad.returncode != 0
    assert "LibraryNotFoundError" in bad.stderr and "TCPFRAME_LIB" in bad.stderr
    assert str(tmp_path / "nope.so") in bad.stderr


def test_library_next_to_the_module_is_found_first(tmp_path):
    pkg = tmp_path / "tcpframe"
    shutil.copytree(REPO / "python" / "tcpframe", pkg, ignore=shutil.ignore_patterns("*.so*", "__pycache__"))
    os.symlink(tcpframe.library_path(), pkg / "libtcpframe.so")
    out = _run_python("import tcpframe; print(tcpframe.library_path())", {"PYTHONPATH": str(tmp_path)}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(pkg / "libtcpframe.so")


def test_no_library_anywhere_names_every_place_tried(tmp_path):
    pkg = tmp_path / "tcpframe"
    shutil.copytree(REPO / "python" / "tcpframe", pkg, ignore=shutil.ignore_patterns("*.so*", "__pycache__"))
    code = ("import tcpframe, ctypes.util\n"
            "ctypes.util.find_library = lambda name: None\n"
            "c = tcpframe.Client  # the client needs no library\n"
            "tcpframe.library_version()\n")
    out = _run_python(code, {"PYTHONPATH": str(tmp_path)}, tmp_path)
    assert out.returncode != 0
    assert "cargo build --release" in out.stderr and "TCPFRAME_LIB" in out.stderr
    assert str(pkg / "libtcpframe.so") in out.stderr


def test_example_echo_selftest_runs():
    out = subprocess.run([sys.executable, str(REPO / "python" / "examples" / "echo.py"), "--selftest"],
                         env={**os.environ, "PYTHONPATH": str(REPO / "python")},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "selftest ok" in out.stdout
