"""Empty environment variables through the installed ``meterwatch`` script. A Kubernetes
manifest with ``value: ""`` or docker-compose's ``${METERWATCH_SSL_CAFILE:-}`` sets the
variable to the empty string; it used to be read as the value "" (``METERWATCH_SSL_CAFILE=``
was refused as a TLS file with PLAINTEXT, ``METERWATCH_BATCH_MAX_SIZE=`` as "not a valid
integer"). An empty or whitespace-only variable now counts as not set: the default applies,
for every setting. A variable with a value is checked as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meterwatch.stream.config import ENV_PREFIX, Settings
from tests.cli_helpers import clean_env, meterwatch, one_line_error, stderr_until

EVERY_VARIABLE = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]


@pytest.mark.parametrize("value", ["", "  ", "\t"], ids=["empty", "spaces", "tab"])
def test_every_empty_variable_means_the_default(value: str) -> None:
    defaults = meterwatch("config")
    assert defaults.returncode == 0, defaults.stderr
    blank = meterwatch("config", env=clean_env(**dict.fromkeys(EVERY_VARIABLE, value)))
    assert blank.returncode == 0, blank.stderr
    assert blank.stderr == ""
    assert json.loads(blank.stdout) == json.loads(defaults.stdout)


def test_an_empty_variable_beside_set_ones() -> None:
    """The case users meet: a manifest that lists every TLS variable, empty on a plain
    cluster, beside the ones that are set."""
    proc = meterwatch("config", env=clean_env(
        METERWATCH_SSL_CAFILE="", METERWATCH_SSL_CERTFILE="", METERWATCH_SSL_KEYFILE=" ",
        METERWATCH_SASL_PASSWORD="", METERWATCH_SECURITY_PROTOCOL="",
        METERWATCH_BATCH_MAX_SIZE="", METERWATCH_CREATE_TOPICS="",
        METERWATCH_GROUP_ID="billing", METERWATCH_TOPIC_PARTITIONS="3"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["ssl_cafile"] is None and got["sasl_password"] is None
    assert got["security_protocol"] == "PLAINTEXT" and got["batch_max_size"] == 65536
    assert got["create_topics"] is True
    assert got["group_id"] == "billing" and got["topic_partitions"] == 3


@pytest.mark.parametrize("env,line", [
    ({"METERWATCH_BATCH_MAX_SIZE": "x"},
     "meterwatch: error: --batch-max-size (from METERWATCH_BATCH_MAX_SIZE): input should be a "
     "valid integer"),
    ({"METERWATCH_SSL_CAFILE": "/nonexistent/ca.pem", "METERWATCH_SECURITY_PROTOCOL": "SSL"},
     "meterwatch: error: --ssl-cafile: no such file '/nonexistent/ca.pem'"),
    ({"METERWATCH_LOG_LEVEL": " trace "},
     "meterwatch: error: --log-level (from METERWATCH_LOG_LEVEL): not one of the allowed"),
], ids=["batch-max-size", "ssl-cafile", "log-level"])
def test_a_variable_with_a_value_is_still_checked(env: dict[str, str], line: str) -> None:
    proc = meterwatch("config", env=clean_env(**env))
    assert one_line_error(proc).startswith(line), proc.stderr
    assert proc.stderr.splitlines() == [one_line_error(proc)]


def test_a_flag_given_empty_is_still_refused(tiny_model: Path) -> None:
    """Only the environment's empty values mean "not set": an empty flag is typed on purpose
    and checked (``--group-id ""`` names the flag), while ``METERWATCH_GROUP_ID=`` is the
    default group."""
    proc = meterwatch("run", "--model-path", str(tiny_model), "--group-id", "",
                      env=clean_env(METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1",
                                    METERWATCH_METRICS_PORT="0"), timeout=120)
    assert one_line_error(proc).startswith("meterwatch: error: --group-id: empty")


def test_meterwatch_run_starts_with_empty_variables(tiny_model: Path) -> None:
    """``meterwatch run`` itself, every other variable empty: it passes its checks and
    prints its settings line with the defaults (then retries a broker that is not there)."""
    env = clean_env(**dict.fromkeys(EVERY_VARIABLE, ""))
    env.update(METERWATCH_MODEL_PATH=str(tiny_model), METERWATCH_METRICS_PORT="0",
               METERWATCH_BOOTSTRAP_SERVERS="127.0.0.1:1", METERWATCH_SCORER="thread")
    text = stderr_until(["run"], "starting:", env=env, timeout_s=120)
    line = next(x for x in text.splitlines() if "starting:" in x)
    assert "security_protocol=PLAINTEXT" in line and "group_id=meterwatch " in line
    assert "ssl_cafile" not in line and "sasl_password" not in line  # unset: not listed
    assert "error" not in text
